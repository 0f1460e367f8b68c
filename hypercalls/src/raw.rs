//! The one way into Xen: a `call` into the hypercall page Xen filled in at domain build.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

// The hypercall page: 128 stubs of 32 bytes. Xen writes them when it builds the domain (the
// HYPERCALL_PAGE ELF note points here). It must be page aligned: Xen does not check, and a
// misaligned page shifts every stub.
global_asm!(
    ".pushsection .text.hypercall_page, \"ax\", @progbits",
    ".balign 4096",
    ".globl hypercall_page",
    "hypercall_page:",
    ".fill 4096, 1, 0xcc",
    ".popsection",
);

unsafe extern "C" {
    static hypercall_page: [u8; 4096];
}

/// Hypercalls issued since boot: an observation point independent of any batching logic above.
static ISSUED: AtomicU64 = AtomicU64::new(0);

/// How many hypercalls this guest has made (the `iret` jump excluded).
pub fn issued() -> u64 {
    ISSUED.load(Ordering::Relaxed)
}

/// Address of the hypercall page (for the ELF note and for `iret`).
pub fn hypercall_page_addr() -> u64 {
    core::ptr::addr_of!(hypercall_page) as u64
}

/// Enter Xen with hypercall `nr` and up to five arguments; returns Xen's raw return value.
///
/// # Safety
/// The arguments must be valid for hypercall `nr`: pointers must point to memory of the layout Xen
/// expects for as long as the call runs, and the call must not break the kernel's own invariants
/// (e.g. unmapping the running stack).
#[inline(always)]
pub unsafe fn hypercall(nr: u32, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    ISSUED.fetch_add(1, Ordering::Relaxed);
    let entry = hypercall_page_addr() + nr as u64 * 32;
    let ret: i64;
    // SAFETY: the caller vouches for the arguments. The stub pushes rcx/r11 on our stack (so no
    // `nostack`) and restores them itself; they are declared clobbered anyway so that nothing
    // depends on the stub's layout. Xen may clobber every argument register, and may read and
    // write any memory we handed it, hence the implicit memory clobber.
    unsafe {
        asm!(
            "call {entry}",
            entry = in(reg) entry,
            inlateout("rdi") a1 => _,
            inlateout("rsi") a2 => _,
            inlateout("rdx") a3 => _,
            inlateout("r10") a4 => _,
            inlateout("r8") a5 => _,
            lateout("rax") ret,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}
