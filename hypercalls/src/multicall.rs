//! Multicall entries: one hypercall's number and arguments, and the slot Xen writes its result to.
//!
//! Xen runs every entry of a multicall and stores each one's own return value in `result`; a
//! failing entry does not stop the ones after it. If Xen cannot go on with the list itself
//! (e.g. it cannot read an entry) the multicall fails and the entries from there on did not
//! run: the constructors below set `result` to [`NOT_RUN`], which Xen never writes, so
//! [`has_run`] tells them apart.

use crate::abi::{
    DomId, HYPERVISOR_MMU_UPDATE, HYPERVISOR_MMUEXT_OP, HYPERVISOR_UPDATE_VA_MAPPING, MmuUpdate,
    MmuextOp,
};

/// One multicall entry (`multicall_entry_t`).
pub type MulticallEntry = xen_sys::multicall_entry;

/// A `result` Xen never writes: its results are 0, a small positive value or a negative errno
/// (above -4096), never `i64::MIN`.
pub const NOT_RUN: u64 = i64::MIN as u64;

/// An empty entry, for initialising arrays.
pub const EMPTY_ENTRY: MulticallEntry = MulticallEntry {
    op: 0,
    result: NOT_RUN,
    args: [0; 6],
};

/// Did Xen run this entry (write its result)?
pub fn has_run(entry: &MulticallEntry) -> bool {
    entry.result != NOT_RUN
}

/// `mmu_update(reqs, count, pdone, domid)` as a multicall entry. The pointers must stay valid
/// until the multicall returns.
pub fn mmu_update_entry(
    reqs: *const MmuUpdate,
    count: u32,
    pdone: *mut u32,
    domid: DomId,
) -> MulticallEntry {
    MulticallEntry {
        op: HYPERVISOR_MMU_UPDATE as u64,
        result: NOT_RUN,
        args: [reqs as u64, count as u64, pdone as u64, domid as u64, 0, 0],
    }
}

/// `mmuext_op(ops, count, pdone, domid)` as a multicall entry.
pub fn mmuext_op_entry(
    ops: *const MmuextOp,
    count: u32,
    pdone: *mut u32,
    domid: DomId,
) -> MulticallEntry {
    MulticallEntry {
        op: HYPERVISOR_MMUEXT_OP as u64,
        result: NOT_RUN,
        args: [ops as u64, count as u64, pdone as u64, domid as u64, 0, 0],
    }
}

/// `update_va_mapping(va, val, flags)` as a multicall entry.
pub fn update_va_mapping_entry(va: u64, val: u64, flags: u64) -> MulticallEntry {
    MulticallEntry {
        op: HYPERVISOR_UPDATE_VA_MAPPING as u64,
        result: NOT_RUN,
        args: [va, val, flags, 0, 0, 0],
    }
}

/// The signed return value Xen stored in an entry after the multicall (meaningful if
/// [`has_run`]).
pub fn entry_result(entry: &MulticallEntry) -> i64 {
    entry.result as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_start_not_run_and_any_result_xen_writes_counts_as_run() {
        let mut e = update_va_mapping_entry(0x1000, 0, 0);
        assert!(!has_run(&e) && !has_run(&EMPTY_ENTRY));
        for written in [0i64, 1, -1, -4095] {
            e.result = written as u64;
            assert!(has_run(&e));
            assert_eq!(entry_result(&e), written);
        }
    }
}
