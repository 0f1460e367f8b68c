//! The top of the kernel: from Xen's entry to the test result. Brings the layers up in order
//! (console, start_info, shared info, traps, M2P, memory, the upcall and tasks), prints the banner, runs what the
//! command line asks for, and powers off.

use hypercalls::abi::{XEN_EXTRAVERSION_LEN, XENVER_EXTRAVERSION, start_info};
use hypercalls::calls;

use crate::arch::{entry, traps};
use crate::framework::{panic, runner};
use crate::xen::start_info::{DIRECT_MAP_BASE, VIRT_BASE, validate_start_info};
use crate::xen::{BootInfo, Role, console, p2m, shared, shutdown};

/// Rust entry, called from `_start` with Xen's `start_info` and the boot stack's top.
///
/// # Safety
/// Called once, by `_start`, with the values Xen passed in rsi and rsp.
pub unsafe extern "C" fn kernel_start(si: *const start_info, boot_stack_top: u64) -> ! {
    // SAFETY: Xen maps start_info in the boot mapping for the domain's life.
    let si: &'static start_info = unsafe { &*si };
    // The console is needed to say anything, and which one depends on the role.
    if si.flags & hypercalls::abi::SIF_INITDOMAIN != 0 {
        console::init_hypervisor_console();
    }
    let info = match validate_start_info(si, boot_stack_top, entry::image_end()) {
        Ok(info) => info,
        Err(e) => panic!("start_info rejected: {} ({:#x})", e.0, e.1),
    };
    if info.role == Role::Guest {
        match console::init_ring_console(info) {
            Ok(true) => {}
            Ok(false) => panic!("a domU without a console page"),
            Err(e) => panic!("cannot map the PV console page: {e}"),
        }
    }
    shared::map_shared_info(info).expect("cannot map shared_info");
    traps::install(&panic::TRAP_HOOKS);
    if let Err(e) = p2m::init_m2p() {
        panic!("XENMEM_machphys_mapping: {e}");
    }
    if let Err(e) = crate::mm::init(info) {
        panic!("memory management: {e}");
    }
    if let Err(e) = crate::sched::init(panic::failsafe) {
        panic!("event callbacks: {e}");
    }
    banner(info);
    let verdict = runner::run_from_cmdline(info.cmdline, crate::tests::TESTS, crate::bench::run);
    println!("Test result: {}", verdict.name());
    shutdown::poweroff()
}

fn banner(info: &BootInfo) {
    let (major, minor) = calls::xen_version();
    let mut extra = [0u8; XEN_EXTRAVERSION_LEN];
    let _ = calls::xen_version_string(XENVER_EXTRAVERSION, &mut extra);
    let extra_len = extra.iter().position(|&b| b == 0).unwrap_or(extra.len());
    let extra = core::str::from_utf8(&extra[..extra_len]).unwrap_or("?");
    let mib = |pages: u64| pages * hypercalls::PAGE_SIZE / (1024 * 1024);
    println!(
        "xenpv-lazy-mmu guest {} on Xen {major}.{minor}{extra}",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "  role {}, magic {}, flags {:#x}, console {}",
        info.role.name(),
        info.magic,
        info.flags,
        console::describe()
    );
    println!(
        "  memory {} pages ({} MiB), free from pfn {:#x}",
        info.nr_pages,
        mib(info.nr_pages),
        info.first_free_pfn
    );
    println!(
        "  image      {:#018x}-{:#018x}",
        VIRT_BASE,
        entry::image_end()
    );
    println!(
        "  P2M        {:#018x} ({} entries)",
        info.mfn_list, info.nr_pages
    );
    println!("  start_info {:#018x}", info.start_info_va);
    println!(
        "  page tables {:#018x} ({} frames)",
        info.pt_base, info.nr_pt_frames
    );
    let fs = crate::mm::stats();
    println!(
        "  mapped up to pfn {:#x} (boot mapping, then direct map at {:#x}); M2P {} entries",
        fs.mapped_end_pfn,
        DIRECT_MAP_BASE,
        p2m::m2p_entries()
    );
    println!(
        "  heap {:#x} ({} KiB); {} frames allocated",
        crate::mm::heap::HEAP_VA,
        crate::mm::heap::HEAP_PAGES * 4,
        fs.allocated
    );
    println!("  cmdline    \"{}\"", info.cmdline.escape_ascii());
}
