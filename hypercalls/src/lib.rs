//! The Xen PV hypercall ABI for a 64-bit guest kernel, and nothing else.
//!
//! * [`abi`]: constants and `#[repr(C)]` structures. Most come from `xen-sys`; the few it lacks
//!   (`DOMID_SELF`, `UVMF_*`, `XENVER_*`, the PV console ring) are defined here from Xen's public
//!   headers.
//! * [`addr`]: typed frame numbers, machine addresses and entry values.
//! * [`error`]: Xen's negative errno values as a named [`XenError`].
//! * `raw` (guest target only): the single `asm!` that enters the hypercall page.
//! * [`calls`] (guest target only): typed wrappers returning `Result`.
//!
//! The types build on the host too, so host tests of the batching logic use the same structures
//! the guest hands to Xen.
#![no_std]

pub mod abi;
pub mod addr;
pub mod error;
pub mod multicall;

#[cfg(target_os = "none")]
pub mod calls;
#[cfg(target_os = "none")]
mod raw;

pub use abi::{DomId, MmuUpdate, MmuextOp};
pub use addr::{MachAddr, Mfn, PAGE_SIZE, Pfn, Pte};
pub use error::{PartialFailure, XenError};
pub use multicall::MulticallEntry;
