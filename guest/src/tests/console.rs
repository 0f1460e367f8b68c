//! The console reaches its backend: `console_io` for dom0, the PV ring for a domU, and the ring
//! drains when more than it holds is written.

use hypercalls::abi::XENCONS_OUTPUT_BYTES;

use crate::framework::runner::{Context, TestOutcome};
use crate::xen::{self, Role, console};

/// How long the backend may take to consume the output: generous, for a loaded host.
const DRAIN_TIMEOUT_NS: u64 = 5_000_000_000;

pub fn console(_: &Context) -> TestOutcome {
    let role = xen::boot_info().role;
    let expected = if role == Role::InitialDomain {
        "console_io"
    } else {
        "PV console ring"
    };
    ensure_eq!(
        console::describe(),
        expected,
        "console backend for {}",
        role.name()
    );
    // Just more than the ring holds, in lines, so the ring wraps and must drain.
    let before = console::bytes_accepted();
    let line = "console check: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abc";
    let line_bytes = line.len() as u64 + 4; // " NN\n"
    let lines = XENCONS_OUTPUT_BYTES as u64 / line_bytes + 2;
    for i in 0..lines {
        println!("{line} {i:02}");
    }
    let accepted = console::bytes_accepted() - before;
    let expected = lines * line_bytes;
    ensure_eq!(accepted, expected, "bytes accepted by the console backend");
    // The backend must actually consume them (for the ring: out_cons catches up with out_prod),
    // within a time bound rather than a number of yields.
    ensure!(
        console::drain_within(DRAIN_TIMEOUT_NS),
        "the console backend did not consume the output"
    );
    Ok(())
}
