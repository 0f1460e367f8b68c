//! A 64-bit Xen PV guest kernel whose page-table updates batch into `mmu_update` multicalls in
//! lazy MMU mode, with `set_ptes()` correct under nested lazy sections.
//!
//! Hardware-independent logic (command line, the lazy-MMU state machine and batch queue, the
//! stress program generator, a host model of Xen) builds on the host and is tested there; the
//! kernel proper (`boot`, `console`, `traps`, page tables, in-guest tests) builds only for
//! `x86_64-unknown-none`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod cmdline;
pub mod mm;
pub mod stress;

#[cfg(target_os = "none")]
#[macro_use]
pub mod console;
#[cfg(target_os = "none")]
pub mod bench;
#[cfg(target_os = "none")]
pub mod boot;
#[cfg(target_os = "none")]
pub mod heap;
#[cfg(target_os = "none")]
pub mod testing;
#[cfg(target_os = "none")]
pub mod tests;
#[cfg(target_os = "none")]
pub mod traps;
#[cfg(target_os = "none")]
pub mod xen;
