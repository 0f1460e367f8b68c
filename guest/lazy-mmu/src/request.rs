//! What can be queued: leaf entry writes, table-entry writes, table operations,
//! `update_va_mapping`; and how a refused one is described.

use core::fmt;

use hypercalls::abi::{
    MMUEXT_INVLPG_LOCAL, MMUEXT_PIN_L1_TABLE, MMUEXT_PIN_L2_TABLE, MMUEXT_PIN_L3_TABLE,
    MMUEXT_PIN_L4_TABLE, MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_UNPIN_TABLE, MmuextOp, mmuext_mfn,
    mmuext_plain, mmuext_va,
};
use hypercalls::{MachAddr, Mfn, Pte};
use x86_64::VirtAddr;

/// A page-table level that can be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableLevel {
    L1,
    L2,
    L3,
    L4,
}

/// The `mmuext_op` commands the kernel may batch. Base-pointer switches and foreign operations
/// are deliberately absent: they are not page-table writes, and switching the tables the kernel
/// runs on is not something a batch may do behind its back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableOp {
    /// `MMUEXT_TLB_FLUSH_LOCAL`.
    TlbFlushLocal,
    /// `MMUEXT_INVLPG_LOCAL` of one address.
    InvlpgLocal(VirtAddr),
    /// `MMUEXT_PIN_Lx_TABLE`: validate the frame as a table of that level and hold it so.
    Pin(TableLevel, Mfn),
    /// `MMUEXT_UNPIN_TABLE`.
    Unpin(Mfn),
}

impl TableOp {
    /// Does this operation change a frame's page type (and so the outcome of other requests)?
    pub fn changes_types(self) -> bool {
        matches!(self, TableOp::Pin(..) | TableOp::Unpin(_))
    }

    /// The `mmuext_op` Xen takes.
    pub fn to_mmuext(self) -> MmuextOp {
        match self {
            TableOp::TlbFlushLocal => mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL),
            TableOp::InvlpgLocal(va) => mmuext_va(MMUEXT_INVLPG_LOCAL, va.as_u64()),
            TableOp::Pin(level, mfn) => {
                let cmd = match level {
                    TableLevel::L1 => MMUEXT_PIN_L1_TABLE,
                    TableLevel::L2 => MMUEXT_PIN_L2_TABLE,
                    TableLevel::L3 => MMUEXT_PIN_L3_TABLE,
                    TableLevel::L4 => MMUEXT_PIN_L4_TABLE,
                };
                mmuext_mfn(cmd, mfn)
            }
            TableOp::Unpin(mfn) => mmuext_mfn(MMUEXT_UNPIN_TABLE, mfn),
        }
    }
}

/// One queued multicall entry. `Updates` and `TableOps` index the batch's request and op
/// arrays, so that coalescing only bumps a count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `mmu_update` of `reqs[first..first + count]`.
    Updates { first: u16, count: u16 },
    /// `mmuext_op` of `ops[first..first + count]`.
    TableOps { first: u16, count: u16 },
    /// `update_va_mapping(va, val, flags)`.
    UpdateVaMapping { va: VirtAddr, val: Pte, flags: u64 },
}

impl Entry {
    /// Requests this entry carries (1 for `update_va_mapping`).
    pub fn len(&self) -> usize {
        match *self {
            Entry::Updates { count, .. } | Entry::TableOps { count, .. } => count as usize,
            Entry::UpdateVaMapping { .. } => 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same entry without its first `n` requests (`n` below [`Entry::len`]).
    pub(crate) fn skip(self, n: usize) -> Entry {
        let n = n as u16;
        match self {
            Entry::Updates { first, count } => Entry::Updates {
                first: first + n,
                count: count - n,
            },
            Entry::TableOps { first, count } => Entry::TableOps {
                first: first + n,
                count: count - n,
            },
            other => other,
        }
    }

    /// Index of the entry's first request in the batch's request or op array.
    pub(crate) fn first(&self) -> usize {
        match *self {
            Entry::Updates { first, .. } | Entry::TableOps { first, .. } => first as usize,
            Entry::UpdateVaMapping { .. } => 0,
        }
    }
}

/// One request Xen was asked to carry out, as the caller gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// A write of `val` to the leaf entry at `ptr`, which maps `va`.
    SetPte {
        ptr: MachAddr,
        val: Pte,
        va: VirtAddr,
    },
    /// A write of `val` to the upper-level (L2..L4) entry at `ptr`: hooking or unhooking a table.
    SetTableEntry { ptr: MachAddr, val: Pte },
    /// An `mmuext_op`.
    TableOp(TableOp),
    /// `update_va_mapping(va, val, flags)`.
    UpdateVaMapping { va: VirtAddr, val: Pte, flags: u64 },
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::SetPte { ptr, val, va } => {
                write!(f, "set_pte va {va:#x} pte maddr {ptr} new value {val}")
            }
            Request::SetTableEntry { ptr, val } => {
                write!(f, "table entry maddr {ptr} new value {val}")
            }
            Request::TableOp(op) => write!(f, "mmuext {op:?}"),
            Request::UpdateVaMapping { va, val, flags } => {
                write!(
                    f,
                    "update_va_mapping va {va:#x} new value {val} flags {flags:#x}"
                )
            }
        }
    }
}
