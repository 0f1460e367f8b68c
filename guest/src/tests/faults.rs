//! Trap handling: a deliberate #PF is caught by a fault probe, reported and recovered from; a
//! privileged instruction in the ring-3 PV kernel is a fatal #GP, reported (run by name).

use hypercalls::abi::MACH2PHYS_VIRT_START;

use crate::arch::{self, probe};
use crate::framework::runner::{Context, TestOutcome, failed};
use crate::xen::{self, p2m};

pub fn page_fault(_: &Context) -> TestOutcome {
    // A read of an unmapped address: #PF, not-present, read, user mode (a PV kernel is ring 3).
    let Err(f) = probe::try_read_u64(0x10) else {
        return Err(failed("reading address 0x10 did not fault"));
    };
    ensure_eq!(f.vector, 14, "vector");
    ensure_eq!(f.address, 0x10, "fault address from vcpu_info.cr2");
    ensure_eq!(
        f.error_code & 0x3,
        0,
        "error code {:#x}: expected not-present read",
        f.error_code
    );
    // A write to the read-only M2P table: #PF, protection violation, write.
    let Err(f) = p2m::probe_m2p_write() else {
        return Err(failed("writing the M2P did not fault"));
    };
    ensure_eq!(
        (f.vector, f.address),
        (14, MACH2PHYS_VIRT_START),
        "write fault"
    );
    ensure_eq!(
        f.error_code & 0x3,
        0x3,
        "error code {:#x}: expected protection write",
        f.error_code
    );
    // A readable address reads normally through the same probe.
    let here = xen::boot_info().start_info_va;
    ensure!(
        probe::try_read_u64(here).is_ok(),
        "reading start_info faulted"
    );
    Ok(())
}

/// Deliberate crash: `invlpg` is privileged and a 64-bit PV kernel runs in ring 3, so it raises
/// #GP; the trap handler must report it (vector, error code, rip, registers) and crash the
/// domain, never fault silently. Run by name only.
pub fn bug_privileged_instruction(_: &Context) -> TestOutcome {
    arch::invlpg(xen::boot_info().start_info_va);
    Err(failed("invlpg did not fault in a PV kernel"))
}
