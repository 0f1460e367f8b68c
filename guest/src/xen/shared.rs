//! Pages Xen shares with the guest (shared info, the PV console ring), each mapped over a page
//! of the image reserved for it: a [`SharedPageSlot`].

use core::cell::UnsafeCell;

use hypercalls::abi::{UVMF_INVLPG, XenconsInterface, shared_info};
use hypercalls::{Mfn, Pte, XenError, calls};
use x86_64::VirtAddr;
use x86_64::structures::paging::PageTableFlags;

use super::start_info::BootInfo;

/// A page of the image whose frame we give up to map a page Xen shares with us (or, read-only,
/// any frame of ours).
#[repr(C, align(4096))]
pub struct SharedPageSlot(UnsafeCell<[u8; 4096]>);

// SAFETY: the contents are only accessed through raw pointers with volatile reads/writes by
// code that knows what Xen put there; no reference to them is ever formed.
unsafe impl Sync for SharedPageSlot {}

impl SharedPageSlot {
    /// Only the statics below: a slot must live as long as the kernel (a slot that could be
    /// freed would leave its memory mapped to the foreign page).
    const fn new() -> Self {
        SharedPageSlot(UnsafeCell::new([0; 4096]))
    }

    pub fn va(&'static self) -> u64 {
        self.0.get() as u64
    }

    /// The image's own frame under the slot (what it maps until it is remapped).
    fn own_mfn(&'static self) -> Option<Mfn> {
        let pfn = (self.va() - super::start_info::VIRT_BASE) / hypercalls::PAGE_SIZE;
        super::p2m::pfn_to_mfn(hypercalls::Pfn::new(pfn))
    }

    /// Point this page's mapping at machine frame `mfn` (read-write).
    ///
    /// # Safety
    /// Nothing may hold a reference into the slot's old contents, and `mfn` must be a frame the
    /// caller may write (a page Xen shares with the domain).
    pub unsafe fn map_machine_frame(&'static self, mfn: Mfn) -> Result<(), XenError> {
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        // SAFETY: the caller's promise; the slot is a page of our own image used for nothing
        // else.
        unsafe { self.map(Pte::new(mfn, flags)) }
    }

    /// Point this page's mapping at machine frame `mfn` read-only (a page table may be mapped
    /// so), or back at the image's own frame, read-write (`mfn` `None`): a slot is never left
    /// unmapped.
    ///
    /// # Safety
    /// Nothing may hold a reference into the slot's old contents.
    pub unsafe fn map_machine_frame_ro(&'static self, mfn: Option<Mfn>) -> Result<(), XenError> {
        let pte = match mfn {
            Some(m) => Pte::new(m, PageTableFlags::PRESENT),
            None => {
                let own = self.own_mfn().ok_or(XenError::Inval)?;
                Pte::new(own, PageTableFlags::PRESENT | PageTableFlags::WRITABLE)
            }
        };
        // SAFETY: the caller's promise; a read-only mapping cannot change the frame.
        unsafe { self.map(pte) }
    }

    /// # Safety
    /// As for [`SharedPageSlot::map_machine_frame`].
    unsafe fn map(&'static self, pte: Pte) -> Result<(), XenError> {
        let va = VirtAddr::new(self.va());
        // SAFETY: the slot is a page of our own image used for nothing else; the caller
        // promises that nothing references its old contents.
        unsafe { calls::update_va_mapping(va, pte, UVMF_INVLPG) }
    }
}

static SHARED_INFO_SLOT: SharedPageSlot = SharedPageSlot::new();
static CONSOLE_SLOT: SharedPageSlot = SharedPageSlot::new();
/// `mm`'s window for reading a frame that neither the boot mapping nor the direct map covers.
pub static PEEK_SLOT: SharedPageSlot = SharedPageSlot::new();

/// Is `va` a page of the image whose mapping a slot changes? Its frame cannot be read at its
/// place in the boot mapping (it shows another page, or the window of a peek).
pub fn is_slot_page(va: u64) -> bool {
    let page = va & !(hypercalls::PAGE_SIZE - 1);
    [&SHARED_INFO_SLOT, &CONSOLE_SLOT, &PEEK_SLOT]
        .iter()
        .any(|s| s.va() == page)
}
static SHARED_INFO_MAPPED: spin::Once<()> = spin::Once::new();

/// Map the shared-info page (for `vcpu_info`, where Xen leaves the fault address).
pub fn map_shared_info(info: &BootInfo) -> Result<(), XenError> {
    SHARED_INFO_MAPPED
        .try_call_once(|| {
            // SAFETY: the slot is reserved for the shared-info page and not referenced before;
            // the page is the domain's to write.
            unsafe { SHARED_INFO_SLOT.map_machine_frame(info.shared_info_maddr.mfn()) }
        })
        .map(drop)
}

/// Map a domU's PV console page; returns its address (`None` for the initial domain).
pub fn map_console_ring(info: &BootInfo) -> Result<Option<*mut XenconsInterface>, XenError> {
    let Some(mfn) = info.console_mfn else {
        return Ok(None);
    };
    // SAFETY: the slot is reserved for the console page and not referenced before; the ring is
    // the domain's to write.
    unsafe { CONSOLE_SLOT.map_machine_frame(mfn)? };
    Ok(Some(CONSOLE_SLOT.va() as *mut XenconsInterface))
}

/// The fault address Xen recorded for vCPU 0's last page fault (0 before shared info is
/// mapped).
pub fn fault_address() -> u64 {
    if SHARED_INFO_MAPPED.get().is_none() {
        return 0;
    }
    let si = SHARED_INFO_SLOT.va() as *const shared_info;
    // SAFETY: the slot maps the shared-info page (checked above); `cr2` is a plain integer Xen
    // writes before delivering #PF.
    unsafe { core::ptr::read_volatile(&raw const (*si).vcpu_info[0].arch.cr2) }
}

/// The shared-info page, once mapped (events, time and the fault address live there).
pub(super) fn shared_info_ptr() -> Option<*mut shared_info> {
    SHARED_INFO_MAPPED.get()?;
    Some(SHARED_INFO_SLOT.va() as *mut shared_info)
}
