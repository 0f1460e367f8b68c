//! What Xen hands the kernel at boot: `start_info` (validated once), the shared-info page with
//! each vCPU's `vcpu_info`, and the P2M / M2P frame tables.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use hypercalls::XenError;
use hypercalls::abi::{self, SIF_INITDOMAIN, UVMF_INVLPG, shared_info, start_info};
use hypercalls::calls;

/// Where Xen's boot mapping (and the image) start: pseudo-physical frame N is at
/// `VIRT_BASE + N * PAGE_SIZE` (see linker.ld).
pub const VIRT_BASE: u64 = 0xFFFF_FFFF_8000_0000;
pub const PAGE_SIZE: u64 = 4096;
/// Most frames Xen's boot mapping can hold: it runs from `VIRT_BASE` to the top of the address
/// space (2 GiB).
pub const BOOT_MAP_MAX_PAGES: u64 = (0u64.wrapping_sub(VIRT_BASE)) / PAGE_SIZE;
/// Where the frames the allocator hands out are mapped, on demand: pseudo-physical frame N at
/// `DIRECT_MAP_BASE + N * PAGE_SIZE` (Linux's `__PAGE_OFFSET` on x86-64), the first L4 slot after
/// the one following Xen's reserved range.
pub const DIRECT_MAP_BASE: u64 = 0xFFFF_8880_0000_0000;
/// Most frames the direct map can hold: 64 TiB, up to the heap's L4 slot.
pub const DIRECT_MAP_MAX_PAGES: u64 = 1 << 34;
/// What Xen's M2P holds for a machine frame that is no domain's (and what an M2P lookup beyond
/// the table gives, as in Linux): `INVALID_M2P_ENTRY`.
pub const INVALID_PFN: u64 = u64::MAX;

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
    /// The command line's bytes up to its NUL (checked by `cmdline::parse_bytes`, not here).
    pub cmdline: &'static [u8],
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
    if nr_pages < image_pages || nr_pages > DIRECT_MAP_MAX_PAGES {
        return Err(StartInfoError(
            "nr_pages is smaller than the image or larger than the 64 TiB direct map",
            nr_pages,
        ));
    }
    // Xen maps frames 0..n at VIRT_BASE (n is the boot mapping's size, not known yet): what it
    // placed there lies within the first min(nr_pages, 2 GiB) of it. Offsets from VIRT_BASE
    // stay below 2^31, so nothing here can overflow.
    let boot_limit = nr_pages.min(BOOT_MAP_MAX_PAGES) * PAGE_SIZE;
    let in_domain = |va: u64, len: u64| {
        va >= VIRT_BASE
            && (va - VIRT_BASE)
                .checked_add(len)
                .is_some_and(|e| e <= boot_limit)
    };
    if !si.pt_base.is_multiple_of(PAGE_SIZE) || !in_domain(si.pt_base, PAGE_SIZE) {
        return Err(StartInfoError(
            "pt_base is not a page of the boot mapping",
            si.pt_base,
        ));
    }
    let pt_bytes = si.nr_pt_frames.checked_mul(PAGE_SIZE);
    if si.nr_pt_frames == 0 || !pt_bytes.is_some_and(|len| in_domain(si.pt_base, len)) {
        return Err(StartInfoError(
            "nr_pt_frames does not fit the boot mapping",
            si.nr_pt_frames,
        ));
    }
    // nr_pages <= 2^34, so the P2M's size cannot overflow.
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
    // Xen always terminates it; a line without NUL is reported by the command-line parser.
    let cmd_len = cmd_bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(cmd_bytes.len());
    let cmdline = &cmd_bytes[..cmd_len];

    if !in_domain(start_info_va, PAGE_SIZE) {
        return Err(StartInfoError(
            "start_info is not inside the boot mapping",
            start_info_va,
        ));
    }
    if boot_stack_top <= VIRT_BASE || !in_domain(boot_stack_top - 1, 1) {
        return Err(StartInfoError(
            "boot stack outside the boot mapping",
            boot_stack_top,
        ));
    }
    // Everything Xen placed in the boot mapping ends at or before the boot stack's top; the
    // P2M, start_info and the page tables come before it, but check rather than trust the order.
    // All of them were checked to lie in the boot mapping, so their offsets from VIRT_BASE are
    // below 2^31 and nothing here overflows.
    let off = |va: u64| va - VIRT_BASE;
    let used_end = [
        off(image_end),
        off(si.mfn_list) + nr_pages * 8,
        off(start_info_va) + PAGE_SIZE,
        off(si.pt_base) + si.nr_pt_frames * PAGE_SIZE,
        off(boot_stack_top),
    ]
    .into_iter()
    .map(page_up)
    .max()
    .unwrap_or(0);
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
        first_free_pfn: used_end / PAGE_SIZE,
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
        // PRESENT | WRITABLE; Xen adds USER for a kernel mapping.
        // SAFETY: the caller's promise; the slot is a page of our own image used for nothing else.
        unsafe { self.map(mfn, 0x3) }
    }

    /// Point this page's mapping at machine frame `mfn` read-only (a page table may be mapped
    /// so), or unmap it (`mfn` `None`).
    ///
    /// # Safety
    /// Nothing may hold a reference into the slot's old contents.
    pub unsafe fn map_machine_frame_ro(&self, mfn: Option<u64>) -> Result<(), XenError> {
        // SAFETY: the caller's promise; the slot is a page of our own image used for nothing else.
        unsafe { self.map(mfn.unwrap_or(0), if mfn.is_some() { 0x1 } else { 0 }) }
    }

    /// # Safety
    /// As for [`SharedPageSlot::map_machine_frame`].
    unsafe fn map(&self, mfn: u64, flags: u64) -> Result<(), XenError> {
        let pte = ((mfn << 12) & 0x000F_FFFF_FFFF_F000) | flags;
        // SAFETY: the slot is a page of our own image used for nothing else; the caller
        // promises that nothing references its old contents.
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

/// Number of entries of Xen's M2P table we may read (`max_mfn + 1`, from
/// `XENMEM_machphys_mapping`, bounded by the table's virtual size); 0 until [`init_m2p`].
static M2P_ENTRIES: AtomicU64 = AtomicU64::new(0);

/// Ask Xen how large the M2P table is. Until this runs every M2P lookup fails.
pub fn init_m2p() -> Result<u64, XenError> {
    let m = calls::machphys_mapping()?;
    if m.v_start != abi::MACH2PHYS_VIRT_START || m.v_end <= m.v_start {
        return Err(XenError::Inval);
    }
    let entries = m.max_mfn.saturating_add(1).min((m.v_end - m.v_start) / 8);
    M2P_ENTRIES.store(entries, Ordering::Relaxed);
    Ok(entries)
}

/// Number of machine frames the M2P table covers (0 before [`init_m2p`]).
pub fn m2p_entries() -> u64 {
    M2P_ENTRIES.load(Ordering::Relaxed)
}

/// Machine frame of pseudo-physical frame `pfn` (P2M lookup); `None` beyond the domain.
pub fn pfn_to_mfn(pfn: u64) -> Option<u64> {
    let info = boot_info();
    if pfn >= info.nr_pages {
        return None;
    }
    // SAFETY: `mfn_list` holds `nr_pages` entries inside the boot mapping (validated), and
    // `pfn < nr_pages`.
    Some(unsafe { core::ptr::read((info.mfn_list as *const u64).add(pfn as usize)) })
}

/// What Xen's M2P table says for machine frame `mfn`: `None` if the frame lies beyond the table
/// or its entry is not mapped (a hole in machine memory). The value may be
/// [`INVALID_PFN`] or another domain's frame number: see [`owned_pfn`].
pub fn mfn_to_pfn(mfn: u64) -> Option<u64> {
    if mfn >= m2p_entries() {
        return None;
    }
    // In bounds (mfn < 2^53), so the address does not overflow; Xen may leave the part of the
    // table for a hole in machine memory unmapped, so read through the fault probe.
    crate::traps::try_read_u64(abi::MACH2PHYS_VIRT_START + mfn * 8).ok()
}

/// Pseudo-physical frame of machine frame `mfn` if it is one of this domain's frames (its M2P
/// entry is a frame of ours whose P2M entry is `mfn` again), else `None`.
pub fn owned_pfn(mfn: u64) -> Option<u64> {
    let pfn = mfn_to_pfn(mfn)?;
    (pfn_to_mfn(pfn)? == mfn).then_some(pfn)
}
