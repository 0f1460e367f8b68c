//! Fault probes: a read or write that turns a fault into an `Err` instead of a crash (like
//! Linux's exception table), for tests that expect a fault and for reading tables that may have
//! holes (Xen's M2P).

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// A fault that a probe turned into a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub vector: u64,
    pub error_code: u64,
    /// Fault address (for #PF).
    pub address: u64,
}

// The instruction at `probe_*_insn` may fault; the trap handler then resumes at `probe_*_fixup`
// with rdx = 1. rdi = address, rsi = value (write).
global_asm!(
    "probe_read_u64:",
    "    xor edx, edx",
    "probe_read_insn:",
    "    mov rax, [rdi]",
    "probe_read_fixup:",
    "    ret",
    "probe_write_u64:",
    "    xor edx, edx",
    "probe_write_insn:",
    "    mov [rdi], rsi",
    "probe_write_fixup:",
    "    ret",
);

unsafe extern "C" {
    static probe_read_insn: u8;
    static probe_read_fixup: u8;
    static probe_write_insn: u8;
    static probe_write_fixup: u8;
}

static LAST_FAULT: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

#[repr(C)]
struct ProbeResult {
    value: u64,
    faulted: u64,
}

unsafe extern "sysv64" {
    fn probe_read_u64(addr: u64) -> ProbeResult;
    fn probe_write_u64(addr: u64, value: u64) -> ProbeResult;
}

fn outcome(r: ProbeResult) -> Result<u64, Fault> {
    if r.faulted == 0 {
        Ok(r.value)
    } else {
        Err(Fault {
            vector: LAST_FAULT[0].load(Ordering::SeqCst),
            error_code: LAST_FAULT[1].load(Ordering::SeqCst),
            address: LAST_FAULT[2].load(Ordering::SeqCst),
        })
    }
}

/// Read a u64 at `addr`, or report the fault it raised.
pub(crate) fn try_read_u64(addr: u64) -> Result<u64, Fault> {
    // SAFETY: the probe only loads from `addr` (no reference is formed, so no aliasing rule is
    // involved); a fault is caught by the trap handler and turned into `faulted = 1`.
    outcome(unsafe { probe_read_u64(addr) })
}

/// Write a u64 at `addr`, or report the fault it raised.
///
/// # Safety
/// If the write succeeds it changes memory at `addr`: nothing may rely on its old contents.
pub(crate) unsafe fn try_write_u64(addr: u64, value: u64) -> Result<(), Fault> {
    // SAFETY: the caller vouches for the write; a fault is caught as for the read.
    outcome(unsafe { probe_write_u64(addr, value) }).map(drop)
}

/// Where to resume after a fault at `rip`, if `rip` is a probe's instruction; records the fault
/// for the probe to return.
pub(super) fn fixup(rip: u64, vector: u64, error_code: u64, address: u64) -> Option<u64> {
    let resume = if rip == &raw const probe_read_insn as u64 {
        &raw const probe_read_fixup as u64
    } else if rip == &raw const probe_write_insn as u64 {
        &raw const probe_write_fixup as u64
    } else {
        return None;
    };
    LAST_FAULT[0].store(vector, Ordering::SeqCst);
    LAST_FAULT[1].store(error_code, Ordering::SeqCst);
    LAST_FAULT[2].store(address, Ordering::SeqCst);
    Some(resume)
}
