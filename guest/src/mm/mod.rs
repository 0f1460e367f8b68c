//! Memory management over the lazy-MMU core (`lazy_mmu`) and real Xen.
//!
//! Layers, lowest first (each only uses those before it):
//! * `frames`: the books of free pseudo-physical frames;
//! * `xen_hv`: the core's `Hypervisor` over real hypercalls (private: only `mm` can build
//!   one, so every request comes through the modules below);
//! * [`pte`]: the page-table write path (`unsafe` where it changes live mappings), reads, TLB
//!   operations, lazy sections;
//! * `pagetable`: walk and grow the live tables;
//! * `memory`: frames for everyone, growing the direct map on demand;
//! * [`region`] (the safe API: an owned VA range and its frames), [`heap`], [`programs`] (seeded
//!   programs on a region), [`batches`] (the benchmark's lower bound and other batch sizes).

mod frames;
mod memory;
mod pagetable;
mod xen_hv;

pub mod batches;
pub mod heap;
pub mod programs;
pub mod pte;
pub mod region;

use core::fmt;

use hypercalls::{MachAddr, Mfn, XenError};
use lazy_mmu::MmuError;

pub use frames::{FrameStats, stats};
pub use xen_hv::peek;

/// Errors of the kernel's memory management.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmError {
    /// Every frame of the domain is in use.
    OutOfMemory { nr_pages: u64 },
    /// The address lies in Xen's reserved range.
    ReservedAddress { va: u64 },
    /// A superpage mapping covers the address at `level`; there is no L1 entry to write.
    HugePage { va: u64, level: u32 },
    /// The machine address is not in a frame of this domain (beyond Xen's M2P table, or
    /// another domain's or Xen's frame): it cannot be read as a page-table entry.
    ForeignFrame { maddr: MachAddr },
    /// A region's page table is missing or already present where it should not be.
    RegionInUse { va: u64 },
    /// An index or count beyond what it may be.
    OutOfRange {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// The lazy-MMU layer or Xen refused.
    Mmu(MmuError),
    /// A hypercall made outside the batch failed.
    Xen(XenError),
}

impl fmt::Display for MmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmError::OutOfMemory { nr_pages } => {
                write!(f, "out of memory: all {nr_pages} frames in use")
            }
            MmError::ReservedAddress { va } => {
                write!(f, "address {va:#x} lies in Xen's reserved range")
            }
            MmError::HugePage { va, level } => {
                write!(f, "address {va:#x} is mapped by a superpage at L{level}")
            }
            MmError::ForeignFrame { maddr } => {
                write!(
                    f,
                    "machine address {maddr} is not in a frame of this domain"
                )
            }
            MmError::RegionInUse { va } => {
                write!(
                    f,
                    "region page table at {va:#x} is not as the region left it"
                )
            }
            MmError::OutOfRange { what, value, limit } => {
                write!(f, "{what} {value} out of range (limit {limit})")
            }
            MmError::Mmu(e) => write!(f, "{e}"),
            MmError::Xen(e) => write!(f, "Xen error {e}"),
        }
    }
}

impl From<MmuError> for MmError {
    fn from(e: MmuError) -> Self {
        MmError::Mmu(e)
    }
}

/// Bring up memory management: find the free frames after the boot structures, then the heap.
pub fn init(info: &crate::xen::BootInfo) -> Result<(), MmError> {
    memory::init(info)?;
    heap::init()
}

/// Machine frame of the L4 the kernel runs on.
pub fn l4_mfn() -> Mfn {
    pagetable::l4_mfn()
}
