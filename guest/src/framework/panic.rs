//! How the kernel dies: a panic or a fatal trap is reported on the console (message or
//! registers, then the backtrace) and the domain ends as crashed, which the harness sees.

use core::fmt::Write;
use core::panic::PanicInfo;

use crate::arch::backtrace;
use crate::arch::traps::{TrapFrame, TrapHooks};
use crate::xen::console::Emergency;
use crate::xen::{events, shared, shutdown};

/// What the trap handler needs from above: where Xen leaves the fault address, and this
/// module's report.
pub static TRAP_HOOKS: TrapHooks = TrapHooks {
    fault_address: shared::fault_address,
    fatal: fatal_trap,
};

fn fatal_trap(frame: &TrapFrame, address: u64) -> ! {
    // Nothing may preempt the report.
    events::mask();
    if let Some(name) = crate::sched::current_name() {
        let _ = write!(&mut Emergency, "\n*** in task '{name}'");
    }
    let _ = frame.describe(address, &mut Emergency);
    let _ = backtrace::write(&mut Emergency, frame.rbp);
    shutdown::crash()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // Nothing may preempt the report.
    events::mask();
    let out = &mut Emergency;
    let _ = match crate::sched::current_name() {
        Some(name) => write!(out, "\n*** PANIC in task '{name}'"),
        None => write!(out, "\n*** PANIC"),
    };
    let _ = match info.location() {
        Some(loc) => writeln!(out, " at {}:{}: {}", loc.file(), loc.line(), info.message()),
        None => writeln!(out, ": {}", info.message()),
    };
    let _ = backtrace::write(out, backtrace::current_rbp());
    shutdown::crash()
}

/// The failsafe callback (Xen could not load a segment register): fatal.
pub fn failsafe(frame: &TrapFrame) -> ! {
    let _ = writeln!(
        &mut Emergency,
        "\n*** failsafe callback (Xen could not load a segment)"
    );
    fatal_trap(frame, 0)
}
