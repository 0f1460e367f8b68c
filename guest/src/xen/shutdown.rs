//! Ending the domain.

use hypercalls::abi::{SHUTDOWN_crash, SHUTDOWN_poweroff};
use hypercalls::calls;

use super::console;

/// Ask Xen to end the domain; never returns. The console is drained first (boundedly) so that
/// the last lines, e.g. the result line, are not lost with the domain.
pub fn shutdown(reason: u32) -> ! {
    console::drain(1000);
    let err = calls::shutdown(reason);
    console::emergency_print(format_args!("SCHEDOP_shutdown refused: {err}\n"));
    loop {
        calls::yield_cpu();
    }
}

/// End the domain normally.
pub fn poweroff() -> ! {
    shutdown(SHUTDOWN_poweroff)
}

/// End the domain as crashed (Xen reports it; the harness sees it).
pub fn crash() -> ! {
    shutdown(SHUTDOWN_crash)
}
