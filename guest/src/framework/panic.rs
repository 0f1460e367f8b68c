//! How the kernel dies: a panic or a fatal trap is reported on the console (message or
//! registers, then the backtrace) and the domain ends as crashed, which the harness sees.

use core::fmt::Write;
use core::panic::PanicInfo;

use crate::arch::backtrace;
use crate::arch::traps::{TrapFrame, TrapHooks};
use crate::xen::console::Emergency;
use crate::xen::{shared, shutdown};

/// What the trap handler needs from above: where Xen leaves the fault address, and this
/// module's report.
pub static TRAP_HOOKS: TrapHooks = TrapHooks {
    fault_address: shared::fault_address,
    fatal: fatal_trap,
};

fn fatal_trap(frame: &TrapFrame, address: u64) -> ! {
    let _ = frame.describe(address, &mut Emergency);
    let _ = backtrace::write(&mut Emergency, frame.rbp);
    shutdown::crash()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let out = &mut Emergency;
    let _ = match info.location() {
        Some(loc) => writeln!(
            out,
            "\n*** PANIC at {}:{}: {}",
            loc.file(),
            loc.line(),
            info.message()
        ),
        None => writeln!(out, "\n*** PANIC: {}", info.message()),
    };
    let _ = backtrace::write(out, backtrace::current_rbp());
    shutdown::crash()
}
