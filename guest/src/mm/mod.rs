//! Memory management: the lazy-MMU batching core (hardware independent) and, in the kernel, the
//! frame allocator, page-table walk and `set_pte`/`set_ptes` built on it.

pub mod lazy;

#[cfg(target_os = "none")]
pub mod frames;
#[cfg(target_os = "none")]
pub mod pagetable;
#[cfg(target_os = "none")]
pub mod pte;
#[cfg(target_os = "none")]
pub mod xen_hv;

#[cfg(test)]
mod lazy_tests;
#[cfg(test)]
pub mod model;

use core::fmt;

use lazy::MmuError;

/// Errors of the kernel's memory management.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmError {
    /// Every frame of the domain is in use.
    OutOfMemory { nr_pages: u64 },
    /// The address is not canonical or lies in Xen's reserved hole.
    ReservedAddress { va: u64 },
    /// A superpage mapping covers the address at `level`; there is no L1 entry to write.
    HugePage { va: u64, level: u32 },
    /// The machine address is not in a frame of this domain (beyond Xen's M2P table, or
    /// another domain's or Xen's frame): it cannot be read as a page-table entry.
    ForeignFrame { maddr: u64 },
    /// The lazy-MMU layer or Xen refused.
    Mmu(MmuError),
}

impl From<MmuError> for MmError {
    fn from(e: MmuError) -> Self {
        MmError::Mmu(e)
    }
}

impl fmt::Display for MmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmError::OutOfMemory { nr_pages } => {
                write!(f, "out of memory: all {nr_pages} frames in use")
            }
            MmError::ReservedAddress { va } => {
                write!(
                    f,
                    "address {va:#x} is not canonical or lies in Xen's reserved range"
                )
            }
            MmError::HugePage { va, level } => {
                write!(f, "address {va:#x} is mapped by a superpage at L{level}")
            }
            MmError::ForeignFrame { maddr } => {
                write!(
                    f,
                    "machine address {maddr:#x} is not in a frame of this domain"
                )
            }
            MmError::Mmu(e) => write!(f, "{e}"),
        }
    }
}

/// Bring up memory management: find the free frames after the boot structures.
#[cfg(target_os = "none")]
pub fn init(info: &crate::xen::BootInfo) -> Result<(), MmError> {
    frames::init(info)
}
