//! Multicall entries: one hypercall's number and arguments, and the slot Xen writes its result to.
//!
//! Xen runs every entry of a multicall and stores each one's own return value in `result`; a
//! failing entry does not stop the ones after it.

use crate::abi::{
    DomId, HYPERVISOR_MMU_UPDATE, HYPERVISOR_MMUEXT_OP, HYPERVISOR_UPDATE_VA_MAPPING, MmuUpdate,
    MmuextOp,
};

/// One multicall entry (`multicall_entry_t`).
pub type MulticallEntry = xen_sys::multicall_entry;

/// An empty entry, for initialising arrays.
pub const EMPTY_ENTRY: MulticallEntry = MulticallEntry {
    op: 0,
    result: 0,
    args: [0; 6],
};

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
        result: 0,
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
        result: 0,
        args: [ops as u64, count as u64, pdone as u64, domid as u64, 0, 0],
    }
}

/// `update_va_mapping(va, val, flags)` as a multicall entry.
pub fn update_va_mapping_entry(va: u64, val: u64, flags: u64) -> MulticallEntry {
    MulticallEntry {
        op: HYPERVISOR_UPDATE_VA_MAPPING as u64,
        result: 0,
        args: [va, val, flags, 0, 0, 0],
    }
}

/// The signed return value Xen stored in an entry after the multicall.
pub fn entry_result(entry: &MulticallEntry) -> i64 {
    entry.result as i64
}
