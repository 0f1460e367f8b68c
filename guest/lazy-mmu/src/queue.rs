//! One vCPU's batch: multicall entries and the `mmu_update` requests and `mmuext_op`s they
//! point to, in fixed-size arrays (no allocation; Linux's `mc_buffer` is the model).
//!
//! Consecutive requests coalesce: writes into one `mmu_update` entry (Linux:
//! `xen_extend_mmu_update`), TLB operations into one `mmuext_op` entry (Linux:
//! `xen_extend_mmuext_op`). Pins and unpins always get an entry of their own.

use hypercalls::abi::{MMU_UPDATE_PREEMPTED, MmuUpdate, MmuextOp, NO_MMUEXT_OP, pt_update};
use hypercalls::{MachAddr, Pte};
use x86_64::VirtAddr;

use crate::hypervisor::Batch;
use crate::request::{Entry, Request, TableOp};

/// Linux's multicall buffer sizes (arch/x86/xen/multicalls.h: 32 entries, 512 bytes of
/// arguments, i.e. 32 `mmu_update` requests).
pub const LINUX_ENTRIES: usize = 32;
pub const LINUX_REQUESTS: usize = 32;

/// Our default sizes: one batch covers two full L1 tables.
pub const DEFAULT_ENTRIES: usize = 64;
pub const DEFAULT_REQUESTS: usize = 1024;

/// The batch: at most `E` entries, `R` `mmu_update` requests and `E` table operations.
pub struct Queue<const E: usize, const R: usize> {
    entries: [Entry; E],
    n_entries: usize,
    reqs: [MmuUpdate; R],
    /// The address each request maps; `None` for an upper-level table entry.
    req_va: [Option<VirtAddr>; R],
    n_reqs: usize,
    ops: [MmuextOp; E],
    op_kind: [TableOp; E],
    n_ops: usize,
    /// The last entry is a run of TLB operations that may grow.
    tlb_run_open: bool,
    /// Bounds of the queued requests' machine addresses: a quick "no hazard" answer.
    ptr_lo: u64,
    ptr_hi: u64,
    /// Queued `update_va_mapping`s (their entry is found by a walk: any read may be affected).
    n_va_updates: usize,
    /// Some entry holds more than one request: a refusal could hold requests up.
    may_hold_up: bool,
    /// 1 + index of the last entry if it is an `mmu_update` entry that later writes may join
    /// (0: none). Keeps the common case, one more write to the open entry, to a few stores.
    open_updates: usize,
}

/// Only the used part of each array is the queue's: a clone copies that part (the model checker
/// clones a whole vCPU state at every step, and 1024 requests are ~40 KiB).
impl<const E: usize, const R: usize> Clone for Queue<E, R> {
    fn clone(&self) -> Self {
        let mut q = Self::new();
        q.clone_from(self);
        q
    }

    fn clone_from(&mut self, src: &Self) {
        let (e, r, o) = (src.n_entries, src.n_reqs, src.n_ops);
        self.entries[..e].copy_from_slice(&src.entries[..e]);
        self.reqs[..r].copy_from_slice(&src.reqs[..r]);
        self.req_va[..r].copy_from_slice(&src.req_va[..r]);
        self.ops[..o].copy_from_slice(&src.ops[..o]);
        self.op_kind[..o].copy_from_slice(&src.op_kind[..o]);
        self.n_entries = e;
        self.n_reqs = r;
        self.n_ops = o;
        self.tlb_run_open = src.tlb_run_open;
        self.ptr_lo = src.ptr_lo;
        self.ptr_hi = src.ptr_hi;
        self.n_va_updates = src.n_va_updates;
        self.may_hold_up = src.may_hold_up;
        self.open_updates = src.open_updates;
    }
}

impl<const E: usize, const R: usize> Queue<E, R> {
    const CAPACITY_OK: () = assert!(
        E >= 1
            && R >= 1
            && E <= u16::MAX as usize
            && R <= u16::MAX as usize
            && (R as u64) < MMU_UPDATE_PREEMPTED as u64
    );

    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::CAPACITY_OK;
        Queue {
            entries: [Entry::Updates { first: 0, count: 0 }; E],
            n_entries: 0,
            reqs: [MmuUpdate { ptr: 0, val: 0 }; R],
            req_va: [None; R],
            n_reqs: 0,
            ops: [NO_MMUEXT_OP; E],
            op_kind: [TableOp::TlbFlushLocal; E],
            n_ops: 0,
            tlb_run_open: false,
            ptr_lo: u64::MAX,
            ptr_hi: 0,
            n_va_updates: 0,
            may_hold_up: false,
            open_updates: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.n_entries == 0
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries[..self.n_entries]
    }

    pub fn requests(&self) -> &[MmuUpdate] {
        &self.reqs[..self.n_reqs]
    }

    /// The whole batch, for a multicall.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            entries: self.entries(),
            reqs: &self.reqs[..self.n_reqs],
            ops: &self.ops[..self.n_ops],
        }
    }

    /// The same arrays with other entries (a remainder after a refusal).
    pub(crate) fn batch_of<'a>(&'a self, entries: &'a [Entry]) -> Batch<'a> {
        Batch {
            entries,
            ..self.batch()
        }
    }

    pub(crate) fn ops(&self) -> &[MmuextOp] {
        &self.ops[..self.n_ops]
    }

    /// Bytes of this buffer (its memory cost per vCPU).
    pub const fn footprint() -> usize {
        core::mem::size_of::<Self>()
    }

    /// Request `i` of the request array, as the caller gave it.
    pub(crate) fn request(&self, i: usize) -> Request {
        let r = self.reqs[i];
        let ptr = MachAddr::new_truncate(r.ptr & !7);
        let val = Pte::from_raw(r.val);
        match self.req_va[i] {
            Some(va) => Request::SetPte { ptr, val, va },
            None => Request::SetTableEntry { ptr, val },
        }
    }

    /// Op `i` of the op array.
    pub(crate) fn table_op(&self, i: usize) -> TableOp {
        self.op_kind[i]
    }

    fn last_is_updates(&self) -> bool {
        matches!(self.entries().last(), Some(Entry::Updates { .. }))
    }

    /// Room for a request; `alone`: it must start an entry of its own (a table entry).
    pub(crate) fn has_room_for_request(&self, alone: bool) -> bool {
        self.n_reqs < R && ((self.last_is_updates() && !alone) || self.n_entries < E)
    }

    pub(crate) fn has_room_for_op(&self, op: TableOp) -> bool {
        let joins_run = self.tlb_run_open && !op.changes_types();
        self.n_ops < E && (joins_run || self.n_entries < E)
    }

    pub(crate) fn has_room_for_entry(&self) -> bool {
        self.n_entries < E
    }

    /// Append a leaf write to the open `mmu_update` entry, if there is one and room: the hot
    /// path of every batched `set_pte`. `false`: nothing was done (use `push_request`).
    #[inline]
    pub(crate) fn try_append(&mut self, ptr: MachAddr, val: Pte, va: VirtAddr) -> bool {
        let at = self.n_reqs;
        let Some(open) = self.open_updates.checked_sub(1) else {
            return false;
        };
        if at >= R {
            return false;
        }
        let Some(Entry::Updates { count, .. }) = self.entries.get_mut(open) else {
            return false;
        };
        *count += 1;
        self.reqs[at] = pt_update(ptr, val);
        self.req_va[at] = Some(va);
        self.n_reqs = at + 1;
        self.ptr_lo = self.ptr_lo.min(ptr.get());
        self.ptr_hi = self.ptr_hi.max(ptr.get());
        self.may_hold_up = true;
        true
    }

    /// Queue a write of `val` at `ptr` (`va`: the address it maps; `None` for a table entry,
    /// which starts an entry of its own so that no refusal ahead of it can hold it up).
    /// The caller checked [`Queue::has_room_for_request`].
    pub(crate) fn push_request(&mut self, ptr: MachAddr, val: Pte, va: Option<VirtAddr>) {
        let alone = va.is_none();
        debug_assert!(self.has_room_for_request(alone));
        let at = self.n_reqs;
        self.reqs[at] = pt_update(ptr, val);
        self.req_va[at] = va;
        self.n_reqs += 1;
        self.ptr_lo = self.ptr_lo.min(ptr.get());
        self.ptr_hi = self.ptr_hi.max(ptr.get());
        let last = self.entries[..self.n_entries].last_mut();
        if let (Some(Entry::Updates { count, .. }), false) = (last, alone) {
            *count += 1;
            self.may_hold_up = true;
        } else {
            self.push_entry(Entry::Updates {
                first: at as u16,
                count: 1,
            });
        }
        // Later leaf writes may join this entry (behind a table entry too: if it is refused,
        // they are held up and reissued in order, see `flush`).
        self.open_updates = self.n_entries;
    }

    /// Queue a table operation. The caller checked [`Queue::has_room_for_op`].
    pub(crate) fn push_op(&mut self, op: TableOp) {
        debug_assert!(self.has_room_for_op(op));
        let at = self.n_ops;
        self.ops[at] = op.to_mmuext();
        self.op_kind[at] = op;
        self.n_ops += 1;
        let joins_run = self.tlb_run_open && !op.changes_types();
        if joins_run {
            if let Some(Entry::TableOps { count, .. }) = self.entries[..self.n_entries].last_mut() {
                *count += 1;
                self.may_hold_up = true;
            }
        } else {
            self.push_entry(Entry::TableOps {
                first: at as u16,
                count: 1,
            });
            self.tlb_run_open = !op.changes_types();
        }
    }

    /// Queue an `update_va_mapping`. The caller checked [`Queue::has_room_for_entry`].
    pub(crate) fn push_va_update(&mut self, va: VirtAddr, val: Pte, flags: u64) {
        self.push_entry(Entry::UpdateVaMapping { va, val, flags });
        self.n_va_updates += 1;
    }

    fn push_entry(&mut self, entry: Entry) {
        debug_assert!(self.n_entries < E);
        self.entries[self.n_entries] = entry;
        self.n_entries += 1;
        self.tlb_run_open = false;
        self.open_updates = 0;
    }

    /// Could a refusal of a queued request hold up the requests behind it in its entry (so that
    /// later entries would run before them)? Only if some entry holds several requests.
    pub(crate) fn may_hold_up(&self) -> bool {
        self.may_hold_up
    }

    /// Could a queued request change the entry at `ptr`?
    pub(crate) fn may_write(&self, ptr: MachAddr) -> bool {
        let ptr = ptr.get() & !7;
        self.n_va_updates > 0
            || (ptr >= self.ptr_lo
                && ptr <= self.ptr_hi
                && self.requests().iter().any(|r| r.ptr & !7 == ptr))
    }

    pub(crate) fn clear(&mut self) {
        self.n_entries = 0;
        self.n_reqs = 0;
        self.n_ops = 0;
        self.tlb_run_open = false;
        self.ptr_lo = u64::MAX;
        self.ptr_hi = 0;
        self.n_va_updates = 0;
        self.may_hold_up = false;
        self.open_updates = 0;
    }
}

impl<const E: usize, const R: usize> Default for Queue<E, R> {
    fn default() -> Self {
        Self::new()
    }
}
