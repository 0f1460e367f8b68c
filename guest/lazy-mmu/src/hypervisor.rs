//! What the batching needs from Xen.

use hypercalls::{MachAddr, MmuUpdate, MmuextOp, PartialFailure, Pte, XenError};
use x86_64::VirtAddr;

use crate::request::Entry;

/// A queued batch as one multicall: `entries` point into `reqs` and `ops`.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    pub entries: &'a [Entry],
    pub reqs: &'a [MmuUpdate],
    pub ops: &'a [MmuextOp],
}

/// What Xen returned for one multicall entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryOutcome {
    pub result: i64,
    /// Requests done (`mmu_update`/`mmuext_op` only): Xen's `pdone`.
    pub done: u32,
}

/// Xen stopped running a multicall's list part-way (e.g. it could not read an entry): entries
/// `0..ran` ran and have outcomes; the rest did not run at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MulticallFailure {
    pub ran: usize,
    pub error: XenError,
}

/// A page-table entry that cannot be read: its frame is not one of this domain's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadError {
    pub ptr: MachAddr,
}

/// The hypercalls the batching needs. Implemented by the kernel over real Xen and by
/// [`crate::model::Model`] on the host.
pub trait Hypervisor {
    /// One `mmu_update` of all of `reqs`; Xen stops at the first failing request.
    fn mmu_update(&mut self, reqs: &[MmuUpdate]) -> Result<(), PartialFailure>;
    /// One `mmuext_op` of all of `ops`; Xen stops at the first failing op.
    fn mmuext_op(&mut self, ops: &[MmuextOp]) -> Result<(), PartialFailure>;
    /// One `update_va_mapping`.
    fn update_va_mapping(&mut self, va: VirtAddr, val: Pte, flags: u64) -> Result<(), XenError>;
    /// One `multicall` of `batch.entries`. Xen runs every entry and writes each one's own result
    /// to `outcomes[i]` (same length as the entries). `Err` says how far Xen got.
    fn multicall(
        &mut self,
        batch: Batch<'_>,
        outcomes: &mut [EntryOutcome],
    ) -> Result<(), MulticallFailure>;
    /// The page-table entry at machine address `ptr`.
    fn read_pte(&self, ptr: MachAddr) -> Result<Pte, ReadError>;
}
