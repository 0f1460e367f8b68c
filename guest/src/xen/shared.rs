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
    pub const fn new() -> Self {
        SharedPageSlot(UnsafeCell::new([0; 4096]))
    }

    pub fn va(&self) -> u64 {
        self.0.get() as u64
    }

    /// Point this page's mapping at machine frame `mfn` (read-write).
    ///
    /// # Safety
    /// Nothing may hold a reference into the slot's old contents, and `mfn` must be a frame the
    /// caller may write (a page Xen shares with the domain).
    pub unsafe fn map_machine_frame(&self, mfn: Mfn) -> Result<(), XenError> {
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        // SAFETY: the caller's promise; the slot is a page of our own image used for nothing
        // else.
        unsafe { self.map(Pte::new(mfn, flags)) }
    }

    /// Point this page's mapping at machine frame `mfn` read-only (a page table may be mapped
    /// so), or unmap it (`mfn` `None`).
    ///
    /// # Safety
    /// Nothing may hold a reference into the slot's old contents.
    pub unsafe fn map_machine_frame_ro(&self, mfn: Option<Mfn>) -> Result<(), XenError> {
        let pte = mfn.map_or(Pte::NONE, |m| Pte::new(m, PageTableFlags::PRESENT));
        // SAFETY: the caller's promise; a read-only mapping cannot change the frame.
        unsafe { self.map(pte) }
    }

    /// # Safety
    /// As for [`SharedPageSlot::map_machine_frame`].
    unsafe fn map(&self, pte: Pte) -> Result<(), XenError> {
        let va = VirtAddr::new(self.va());
        // SAFETY: the slot is a page of our own image used for nothing else; the caller
        // promises that nothing references its old contents.
        unsafe { calls::update_va_mapping(va, pte, UVMF_INVLPG) }
    }
}

impl Default for SharedPageSlot {
    fn default() -> Self {
        Self::new()
    }
}

static SHARED_INFO_SLOT: SharedPageSlot = SharedPageSlot::new();
static CONSOLE_SLOT: SharedPageSlot = SharedPageSlot::new();
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
