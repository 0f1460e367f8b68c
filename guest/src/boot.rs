//! From Xen's entry to the test result: validate `start_info`, bring up console, traps and heap,
//! print the banner, run what the command line asks for, shut down.

use core::panic::PanicInfo;

use hypercalls::abi::{SHUTDOWN_crash, SHUTDOWN_poweroff, start_info};
use hypercalls::calls;

use crate::xen::{self, Role, VIRT_BASE};

pub const BOOT_STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(4096))]
pub struct Stack([u8; BOOT_STACK_SIZE]);

/// The kernel's stack (Xen's boot stack is a single page).
#[unsafe(no_mangle)]
pub static mut BOOT_STACK: Stack = Stack([0; BOOT_STACK_SIZE]);

unsafe extern "C" {
    static __image_end: u8;
}

/// End of the kernel image (page aligned, after .bss).
pub fn image_end() -> u64 {
    &raw const __image_end as u64
}

/// Rust entry, called from `_start` with Xen's `start_info` and the boot stack's top.
///
/// # Safety
/// Called once, by `_start`, with the values Xen passed in rsi and rsp.
pub unsafe extern "C" fn kernel_start(si: *const start_info, boot_stack_top: u64) -> ! {
    // SAFETY: Xen maps start_info in the boot mapping for the domain's life.
    let si: &'static start_info = unsafe { &*si };
    // The console is needed to say anything, and which one depends on the role.
    let initial_domain = si.flags & hypercalls::abi::SIF_INITDOMAIN != 0;
    if initial_domain {
        crate::console::init_hypervisor_console();
    }
    let info = match xen::validate_start_info(si, boot_stack_top) {
        Ok(info) => info,
        Err(e) => panic!("start_info rejected: {} ({:#x})", e.0, e.1),
    };
    if info.role == Role::Guest {
        let ring = xen::map_console_ring(info).expect("cannot map the PV console page");
        // SAFETY: the console slot maps the console page from now on.
        unsafe { crate::console::init_ring_console(ring, info.console_evtchn) };
    }
    xen::map_shared_info(info).expect("cannot map shared_info");
    crate::traps::install();
    if let Err(e) = xen::init_m2p() {
        panic!("XENMEM_machphys_mapping: {e}");
    }
    if let Err(e) = crate::mm::init(info) {
        panic!("memory management: {e}");
    }
    if let Err(e) = crate::heap::init() {
        panic!("heap: {e}");
    }
    banner(info);
    let verdict = crate::testing::run_from_cmdline(info.cmdline);
    println!("Test result: {}", verdict.name());
    shutdown(SHUTDOWN_poweroff)
}

fn banner(info: &xen::BootInfo) {
    let (major, minor) = calls::xen_version();
    let mut extra = [0u8; hypercalls::abi::XEN_EXTRAVERSION_LEN];
    let _ = calls::xen_version_string(hypercalls::abi::XENVER_EXTRAVERSION, &mut extra);
    let extra_len = extra.iter().position(|&b| b == 0).unwrap_or(extra.len());
    let extra = core::str::from_utf8(&extra[..extra_len]).unwrap_or("?");
    let mib = |pages: u64| pages * 4096 / (1024 * 1024);
    println!(
        "xenpv-lazy-mmu guest {} on Xen {major}.{minor}{extra}",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "  role {}, magic {}, flags {:#x}, console {}",
        info.role.name(),
        info.magic,
        info.flags,
        crate::console::describe()
    );
    println!(
        "  memory {} pages ({} MiB), free from pfn {:#x}",
        info.nr_pages,
        mib(info.nr_pages),
        info.first_free_pfn
    );
    println!("  image      {:#018x}-{:#018x}", VIRT_BASE, image_end());
    println!(
        "  P2M        {:#018x} ({} entries)",
        info.mfn_list, info.nr_pages
    );
    println!("  start_info {:#018x}", info.start_info_va);
    println!(
        "  page tables {:#018x} ({} frames)",
        info.pt_base, info.nr_pt_frames
    );
    let fs = crate::mm::frames::stats();
    println!(
        "  mapped up to pfn {:#x} (boot mapping, then direct map at {:#x}); M2P {} entries",
        fs.mapped_end_pfn,
        xen::DIRECT_MAP_BASE,
        xen::m2p_entries()
    );
    println!(
        "  heap {:#x} ({} KiB); {} frames allocated",
        crate::heap::HEAP_VA,
        crate::heap::HEAP_PAGES * 4,
        fs.allocated
    );
    println!("  cmdline    \"{}\"", info.cmdline.escape_ascii());
}

/// Ask Xen to end the domain; never returns. The console is drained first (boundedly) so that
/// the last lines, e.g. the result line, are not lost with the domain.
pub fn shutdown(reason: u32) -> ! {
    crate::console::drain(1000);
    let err = calls::shutdown(reason);
    crate::console::emergency_print(format_args!("SCHEDOP_shutdown refused: {err}\n"));
    loop {
        calls::yield_cpu();
    }
}

/// End the domain as crashed (Xen reports it; the harness sees it).
pub fn crash() -> ! {
    shutdown(SHUTDOWN_crash)
}

/// Print the return addresses on the frame-pointer chain starting at `rbp`.
pub fn print_backtrace(mut rbp: u64) {
    use crate::console::emergency_print as p;
    p(format_args!("    backtrace:"));
    let stack_lo = &raw const BOOT_STACK as u64;
    let stack_hi = stack_lo + BOOT_STACK_SIZE as u64;
    for _ in 0..32 {
        if rbp < stack_lo || rbp + 16 > stack_hi || !rbp.is_multiple_of(8) {
            break;
        }
        // SAFETY: rbp points into our stack (checked above): [rbp] = caller's rbp,
        // [rbp + 8] = return address, as every frame-pointer prologue leaves them.
        let (next, ret) = unsafe { (*(rbp as *const u64), *((rbp + 8) as *const u64)) };
        if ret == 0 {
            break;
        }
        p(format_args!(" {ret:#x}"));
        rbp = next;
    }
    p(format_args!("\n"));
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let p = crate::console::emergency_print;
    match info.location() {
        Some(loc) => p(format_args!(
            "\n*** PANIC at {}:{}: {}\n",
            loc.file(),
            loc.line(),
            info.message()
        )),
        None => p(format_args!("\n*** PANIC: {}\n", info.message())),
    }
    let rbp: u64;
    // SAFETY: reads the frame pointer register only.
    unsafe { core::arch::asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack)) };
    print_backtrace(rbp);
    crash()
}
