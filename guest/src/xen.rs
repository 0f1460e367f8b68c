//! What Xen hands the kernel at boot: `start_info` (validated once), the shared-info page with
//! each vCPU's `vcpu_info`, and the P2M / M2P frame tables.

use core::cell::UnsafeCell;

use hypercalls::XenError;
use hypercalls::abi::{self, SIF_INITDOMAIN, UVMF_INVLPG, shared_info, start_info};
use hypercalls::calls;

/// Where Xen's boot mapping (and the image) start: pseudo-physical frame N is at
/// `VIRT_BASE + N * PAGE_SIZE` (see linker.ld).
pub const VIRT_BASE: u64 = 0xFFFF_FFFF_8000_0000;
pub const PAGE_SIZE: u64 = 4096;

/// Which kind of domain we are: decides the console and what Xen lets us do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The initial domain (dom0): `console_io` reaches the serial line.
    InitialDomain,
    /// Any other PV domain (a domU, or the guest of the PV shim): console via the ring.
    Guest,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::InitialDomain => "dom0 (initial domain)",
            Role::Guest => "domU",
        }
    }
}

/// The validated facts of `start_info`, with the addresses the rest of the kernel needs.
#[derive(Debug)]
pub struct BootInfo {
    pub magic: &'static str,
    pub role: Role,
    pub flags: u32,
    pub nr_pages: u64,
    pub shared_info_maddr: u64,
    pub pt_base: u64,
    pub nr_pt_frames: u64,
    pub mfn_list: u64,
    pub start_info_va: u64,
    pub console_mfn: u64,
    pub console_evtchn: u32,
    pub cmdline: &'static str,
    /// First pseudo-physical frame after everything Xen put in the boot mapping.
    pub first_free_pfn: u64,
}

static BOOT_INFO: spin::Once<BootInfo> = spin::Once::new();

/// The boot facts; valid after `boot::kernel_start` validated them.
pub fn boot_info() -> &'static BootInfo {
    BOOT_INFO.get().expect("start_info not validated yet")
}

/// Why `start_info` was rejected.
#[derive(Debug)]
pub struct StartInfoError(pub &'static str, pub u64);

fn page_up(x: u64) -> u64 {
    x.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Check `start_info` for the facts the kernel relies on and keep them.
pub fn validate_start_info(
    si: &'static start_info,
    boot_stack_top: u64,
) -> Result<&'static BootInfo, StartInfoError> {
    // SAFETY: `magic` is a c_char array; reading it as bytes of the same length is sound.
    let magic_bytes: &'static [u8; 32] = unsafe { &*(&si.magic as *const _ as *const [u8; 32]) };
    let magic_len = magic_bytes.iter().position(|&b| b == 0).unwrap_or(32);
    let magic = core::str::from_utf8(&magic_bytes[..magic_len])
        .map_err(|_| StartInfoError("magic is not text", 0))?;
    if !magic.starts_with("xen-3.0-x86_64") {
        return Err(StartInfoError(
            "magic is not xen-3.0-x86_64*",
            magic_len as u64,
        ));
    }
    let nr_pages = si.nr_pages;
    let image_end = crate::boot::image_end();
    let image_pages = (image_end - VIRT_BASE) / PAGE_SIZE;
    if nr_pages < image_pages || nr_pages > (u64::MAX - VIRT_BASE) / PAGE_SIZE {
        return Err(StartInfoError(
            "nr_pages is smaller than the image or larger than the 2 GiB linear map at VIRT_BASE",
            nr_pages,
        ));
    }
    let mapped_end = VIRT_BASE + nr_pages * PAGE_SIZE;
    let in_domain =
        |va: u64, len: u64| va >= VIRT_BASE && va.checked_add(len).is_some_and(|e| e <= mapped_end);
    if !si.pt_base.is_multiple_of(PAGE_SIZE) || !in_domain(si.pt_base, PAGE_SIZE) {
        return Err(StartInfoError(
            "pt_base is not a page of the boot mapping",
            si.pt_base,
        ));
    }
    if si.nr_pt_frames == 0 || !in_domain(si.pt_base, si.nr_pt_frames * PAGE_SIZE) {
        return Err(StartInfoError(
            "nr_pt_frames does not fit the boot mapping",
            si.nr_pt_frames,
        ));
    }
    if !si.mfn_list.is_multiple_of(8) || !in_domain(si.mfn_list, nr_pages * 8) {
        return Err(StartInfoError(
            "mfn_list (P2M) is not inside the boot mapping",
            si.mfn_list,
        ));
    }
    let start_info_va = si as *const _ as u64;
    let role = if si.flags & SIF_INITDOMAIN != 0 {
        Role::InitialDomain
    } else {
        Role::Guest
    };
    // SAFETY: reading a union of two plain-integer structs; both views are always valid.
    let (console_mfn, console_evtchn) = unsafe { (si.console.domU.mfn, si.console.domU.evtchn) };
    if role == Role::Guest && (console_mfn == 0 || console_evtchn == 0) {
        return Err(StartInfoError(
            "domU without a console page or event channel",
            console_mfn,
        ));
    }
    // SAFETY: `cmd_line` is an i8 array; reading it as bytes of the same length is sound.
    let cmd_bytes: &'static [u8; 1024] =
        unsafe { &*(&si.cmd_line as *const _ as *const [u8; 1024]) };
    let cmd_len = cmd_bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartInfoError("cmd_line is not NUL-terminated", 1024))?;
    let cmdline = core::str::from_utf8(&cmd_bytes[..cmd_len])
        .map_err(|_| StartInfoError("cmd_line is not UTF-8", cmd_len as u64))?;

    // Everything Xen placed in the boot mapping ends at or before the boot stack's top; the
    // P2M, start_info and the page tables come before it, but check rather than trust the order.
    let used_end = [
        image_end,
        si.mfn_list + nr_pages * 8,
        start_info_va + PAGE_SIZE,
        si.pt_base + si.nr_pt_frames * PAGE_SIZE,
        boot_stack_top,
    ]
    .into_iter()
    .map(page_up)
    .max()
    .unwrap_or(image_end);
    if !in_domain(used_end - 1, 1) {
        return Err(StartInfoError(
            "boot stack outside the boot mapping",
            boot_stack_top,
        ));
    }
    Ok(BOOT_INFO.call_once(|| BootInfo {
        magic,
        role,
        flags: si.flags,
        nr_pages,
        shared_info_maddr: si.shared_info,
        pt_base: si.pt_base,
        nr_pt_frames: si.nr_pt_frames,
        mfn_list: si.mfn_list,
        start_info_va,
        console_mfn,
        console_evtchn,
        cmdline,
        first_free_pfn: (used_end - VIRT_BASE) / PAGE_SIZE,
    }))
}

/// A page of the image whose frame we give up to map a page Xen shares with us.
#[repr(C, align(4096))]
pub struct SharedPageSlot(UnsafeCell<[u8; 4096]>);

// SAFETY: the contents are only accessed through raw pointers with volatile reads/writes by
// code that knows what Xen put there.
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
    /// Nothing may hold a reference into the slot's old contents.
    pub unsafe fn map_machine_frame(&self, mfn: u64) -> Result<(), XenError> {
        let pte = (mfn << 12) | 0x3; // PRESENT | WRITABLE; Xen adds USER for a kernel mapping
        // SAFETY: the slot is a page of our own image used for nothing else.
        unsafe { calls::update_va_mapping(self.va(), pte, UVMF_INVLPG) }
    }
}

impl Default for SharedPageSlot {
    fn default() -> Self {
        Self::new()
    }
}

static SHARED_INFO_SLOT: SharedPageSlot = SharedPageSlot::new();
static CONSOLE_SLOT: SharedPageSlot = SharedPageSlot::new();

/// Map the shared-info page (for `vcpu_info`, where Xen leaves the fault address).
pub fn map_shared_info(info: &BootInfo) -> Result<(), XenError> {
    // SAFETY: the slot is reserved for the shared-info page and not referenced before.
    unsafe { SHARED_INFO_SLOT.map_machine_frame(info.shared_info_maddr >> 12) }
}

/// Map the PV console page of a domU; returns its address.
pub fn map_console_ring(info: &BootInfo) -> Result<*mut abi::XenconsInterface, XenError> {
    // SAFETY: the slot is reserved for the console page and not referenced before.
    unsafe { CONSOLE_SLOT.map_machine_frame(info.console_mfn)? };
    Ok(CONSOLE_SLOT.va() as *mut abi::XenconsInterface)
}

/// The fault address Xen recorded for vCPU 0's last page fault.
pub fn fault_address() -> u64 {
    let si = SHARED_INFO_SLOT.va() as *const shared_info;
    // SAFETY: the slot maps the shared-info page once `map_shared_info` ran (before the trap
    // table is installed); `cr2` is a plain integer Xen writes before delivering #PF.
    unsafe { core::ptr::read_volatile(&raw const (*si).vcpu_info[0].arch.cr2) }
}

/// Machine frame of pseudo-physical frame `pfn` (P2M lookup).
pub fn pfn_to_mfn(pfn: u64) -> u64 {
    let info = boot_info();
    assert!(
        pfn < info.nr_pages,
        "pfn {pfn:#x} beyond nr_pages {:#x}",
        info.nr_pages
    );
    // SAFETY: `mfn_list` holds `nr_pages` entries inside the boot mapping (validated).
    unsafe { core::ptr::read((info.mfn_list as *const u64).add(pfn as usize)) }
}

/// Pseudo-physical frame of machine frame `mfn` (M2P lookup in Xen's read-only table).
pub fn mfn_to_pfn(mfn: u64) -> u64 {
    // SAFETY: the M2P is mapped read-only in every PV guest and covers every machine frame the
    // domain can hold; we only look up frames Xen gave us.
    unsafe { core::ptr::read_volatile((abi::MACH2PHYS_VIRT_START as *const u64).add(mfn as usize)) }
}

/// Kernel virtual address of pseudo-physical frame `pfn` in the linear map.
pub fn pfn_to_va(pfn: u64) -> u64 {
    VIRT_BASE + pfn * PAGE_SIZE
}
