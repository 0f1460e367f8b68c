//! `start_info`: validated once at boot into a [`BootInfo`] the rest of the kernel reads.

use hypercalls::abi::{SIF_INITDOMAIN, start_info};
use hypercalls::{MachAddr, Mfn, PAGE_SIZE};

/// Where Xen's boot mapping (and the image) start: pseudo-physical frame N is at
/// `VIRT_BASE + N * PAGE_SIZE` (see linker.ld).
pub const VIRT_BASE: u64 = 0xFFFF_FFFF_8000_0000;
/// Most frames Xen's boot mapping can hold: it runs from `VIRT_BASE` to the top of the address
/// space (2 GiB).
pub const BOOT_MAP_MAX_PAGES: u64 = (0u64.wrapping_sub(VIRT_BASE)) / PAGE_SIZE;
/// Where the frames the allocator hands out are mapped, on demand: pseudo-physical frame N at
/// `DIRECT_MAP_BASE + N * PAGE_SIZE` (Linux's `__PAGE_OFFSET` on x86-64), the first L4 slot after
/// the one following Xen's reserved range.
pub const DIRECT_MAP_BASE: u64 = 0xFFFF_8880_0000_0000;
/// Most frames the direct map can hold: 64 TiB, up to the heap's L4 slot.
pub const DIRECT_MAP_MAX_PAGES: u64 = 1 << 34;

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
    pub shared_info_maddr: MachAddr,
    pub pt_base: u64,
    pub nr_pt_frames: u64,
    pub mfn_list: u64,
    pub start_info_va: u64,
    /// The PV console page (a domU's; `None` for the initial domain).
    pub console_mfn: Option<Mfn>,
    pub console_evtchn: u32,
    /// The command line's bytes up to its NUL (checked by `cmdline::parse_bytes`, not here).
    pub cmdline: &'static [u8],
    /// First pseudo-physical frame after everything Xen put in the boot mapping.
    pub first_free_pfn: u64,
}

static BOOT_INFO: spin::Once<BootInfo> = spin::Once::new();

/// The boot facts; valid after [`validate_start_info`] accepted them.
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
/// `boot_stack_top` is where Xen's boot stack ended, `image_end` where the kernel image ends.
pub fn validate_start_info(
    si: &'static start_info,
    boot_stack_top: u64,
    image_end: u64,
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
    let console_mfn = match role {
        Role::InitialDomain => None,
        Role::Guest => match Mfn::new(console_mfn) {
            Some(m) if m.get() != 0 && console_evtchn != 0 => Some(m),
            _ => {
                return Err(StartInfoError(
                    "domU without a valid console page or event channel",
                    console_mfn,
                ));
            }
        },
    };
    let shared_info_maddr = MachAddr::new(si.shared_info)
        .filter(|m| m.page_offset() == 0)
        .ok_or(StartInfoError(
            "shared_info is not a page-aligned machine address",
            si.shared_info,
        ))?;
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
        shared_info_maddr,
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
