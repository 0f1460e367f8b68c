//! A 64-bit Xen PV guest kernel whose page-table updates batch into `mmu_update` multicalls in
//! lazy MMU mode (the `lazy_mmu` crate), with `set_ptes()` correct under nested lazy sections.
//!
//! Layers, lowest first; each uses only those below it:
//! * [`arch`]: entry stack, trap table and stubs, fault probes, backtrace;
//! * [`xen`]: start_info, shared pages, P2M/M2P, console, shutdown;
//! * [`mm`]: frames, page tables, the page-table write path, [`mm::region::Region`] (the safe
//!   API), heap;
//! * [`sched`]: tasks, the round-robin scheduler, preemption from the timer upcall, the
//!   context-switch rule for lazy MMU state;
//! * [`framework`]: command line, test runner, panic and fatal-trap reports;
//! * [`tests`] and [`bench`]: no `unsafe` at all;
//! * `boot`: brings the layers up and runs what the command line asks for.
//!
//! Only the command-line parser is hardware independent (tested on the host); everything else
//! builds for `x86_64-unknown-none` only.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

#[cfg(target_os = "none")]
#[macro_use]
pub mod xen;
#[macro_use]
pub mod framework;
#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod bench;
#[cfg(target_os = "none")]
pub mod boot;
#[cfg(target_os = "none")]
pub mod mm;
#[cfg(target_os = "none")]
pub mod sched;
#[cfg(target_os = "none")]
pub mod tests;
