//! The lowest layer of the kernel: what the CPU and the image are. Entry stack and image
//! bounds, the trap table and its stubs, the event upcall and context switches, fault probes,
//! the frame-pointer backtrace. Nothing here
//! knows about Xen's shared pages, the console or memory management: what a trap needs from
//! above (the fault address, what to do with a fatal trap) is handed in by [`traps::install`].

pub mod backtrace;
pub mod context;
pub mod entry;
pub mod probe;
pub mod traps;

/// Execute `invlpg` on `va`. In ring 0 it drops one TLB entry (harmless); a 64-bit PV kernel
/// runs in ring 3, where it raises #GP (what the deliberate-crash test shows).
pub fn invlpg(va: u64) {
    // SAFETY: invlpg reads and writes no memory; at worst it drops a TLB entry, or faults.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack)) };
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter; a PV kernel may execute it.
    unsafe { core::arch::x86_64::_rdtsc() }
}
