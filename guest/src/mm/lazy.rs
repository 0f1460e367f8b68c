//! Lazy MMU mode: batch page-table writes into `mmu_update` multicalls, with Linux's nesting
//! semantics.
//!
//! The state machine mirrors Linux's generic lazy MMU mode (include/linux/pgtable.h since the
//! 2025 rework: `lazy_mmu_mode_enable/disable/pause/resume`, an enable count and a pause count):
//!
//! * the outermost [`enter`](LazyMmu::enter) starts batching; a nested one only counts;
//! * a nested [`leave`](LazyMmu::leave) **flushes** and stays lazy; the outermost leave flushes
//!   and ends batching. (In 2023 generic `set_ptes()` began to enter lazy mode inside
//!   `move_ptes()`'s lazy section; x86 PV's `BUG_ON` on a nested enter killed every Xen PV guest.
//!   `strict` mode keeps that old behaviour so it can be demonstrated.)
//! * [`pause`](LazyMmu::pause) flushes and suspends batching, [`resume`](LazyMmu::resume) picks it
//!   up again at the same depth; pauses nest, and enter/leave while paused do nothing.
//!
//! The queue is one fixed-size buffer per vCPU (no allocation): multicall entries plus the
//! `mmu_update` requests they point to. Consecutive `mmu_update` requests coalesce into one entry
//! (Linux: `xen_extend_mmu_update`). A flush of a single entry makes that hypercall directly.
//!
//! Everything talks to Xen through the [`Hypervisor`] trait, so this file builds and is tested on
//! the host against a model of Xen's semantics, and runs in the guest against the real thing.

use core::fmt;

use hypercalls::abi::{
    MMU_UPDATE_PREEMPTED, MMUEXT_UNPIN_TABLE, MmuUpdate, MmuextOp, mmuext_arg1, pt_update,
};
use hypercalls::{PartialFailure, XenError};

/// Page-table entries per table.
pub const ENTRIES_PER_TABLE: u64 = 512;
const PAGE_SIZE: u64 = 4096;

/// The hypercalls the batching needs. Implemented by the guest over real hypercalls and by the
/// host model in tests.
pub trait Hypervisor {
    /// One `mmu_update` hypercall with all of `reqs`.
    fn mmu_update(&mut self, reqs: &[MmuUpdate]) -> Result<(), PartialFailure>;
    /// One `mmuext_op` hypercall.
    fn mmuext_op(&mut self, ops: &[MmuextOp]) -> Result<(), PartialFailure>;
    /// One `update_va_mapping` hypercall.
    fn update_va_mapping(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError>;
    /// One `multicall` of `entries` (whose `mmu_update` requests live in `reqs`). Xen runs every
    /// entry; the implementation writes each entry's return value and done count to `outcomes`.
    /// `Err` means Xen could not run the list as a whole (e.g. the marshalling buffer is too
    /// small, or Xen failed to read the list part-way); the core then issues every entry on its
    /// own, repeating any that already ran, which is harmless for writes and flushes.
    fn multicall(
        &mut self,
        entries: &[Entry],
        reqs: &[MmuUpdate],
        outcomes: &mut [EntryOutcome],
    ) -> Result<(), XenError>;
    /// Read the page-table entry at machine address `ptr` (the guest reads its read-only mapping).
    fn read_pte(&self, ptr: u64) -> u64;
}

/// One queued multicall entry.
#[derive(Clone, Copy)]
pub enum Entry {
    /// `mmu_update` of `reqs[first..first + count]`.
    MmuUpdate { first: u16, count: u16 },
    /// `mmuext_op` of one op (pin, unpin, TLB flush, invlpg).
    Mmuext(MmuextOp),
    /// `update_va_mapping(va, val, flags)`.
    UpdateVaMapping { va: u64, val: u64, flags: u64 },
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::MmuUpdate { first, count } => write!(f, "mmu_update[{first}..+{count}]"),
            Entry::Mmuext(op) => write!(f, "mmuext_op(cmd {}, {:#x})", op.cmd, mmuext_arg1(op)),
            Entry::UpdateVaMapping { va, val, flags } => {
                write!(f, "update_va_mapping({va:#x}, {val:#x}, {flags:#x})")
            }
        }
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Entry::MmuUpdate { first: a, count: b }, Entry::MmuUpdate { first: c, count: d }) => {
                (a, b) == (c, d)
            }
            (Entry::Mmuext(a), Entry::Mmuext(b)) => {
                a.cmd == b.cmd && mmuext_arg1(a) == mmuext_arg1(b)
            }
            (
                Entry::UpdateVaMapping {
                    va: a,
                    val: b,
                    flags: c,
                },
                Entry::UpdateVaMapping {
                    va: d,
                    val: e,
                    flags: f,
                },
            ) => (a, b, c) == (d, e, f),
            _ => false,
        }
    }
}

impl Eq for Entry {}

/// What Xen returned for one multicall entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryOutcome {
    pub result: i64,
    /// Requests done (`mmu_update`/`mmuext_op` only).
    pub done: u32,
}

/// Why a flush happened; counted per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// The buffer had no room for the next entry or request.
    Full,
    /// The outermost leave.
    Leave,
    /// A nested leave (Linux's fix: every leave flushes).
    NestedLeave,
    /// `flush()`.
    Explicit,
    /// A read of a PTE with a queued write.
    ReadHazard,
    /// `pause()`.
    Pause,
}

impl FlushReason {
    pub const ALL: [FlushReason; 6] = [
        FlushReason::Full,
        FlushReason::Leave,
        FlushReason::NestedLeave,
        FlushReason::Explicit,
        FlushReason::ReadHazard,
        FlushReason::Pause,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FlushReason::Full => "full",
            FlushReason::Leave => "leave",
            FlushReason::NestedLeave => "nested-leave",
            FlushReason::Explicit => "explicit",
            FlushReason::ReadHazard => "read-hazard",
            FlushReason::Pause => "pause",
        }
    }
}

/// What the batching did, for tests and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Hypercalls issued (a multicall counts once).
    pub hypercalls: u64,
    /// Of those, multicalls.
    pub multicalls: u64,
    /// Multicall entries issued (inside multicalls).
    pub multicall_entries: u64,
    /// `mmu_update` requests handed to Xen (including resubmissions).
    pub requests: u64,
    /// Other operations (mmuext, update_va_mapping) handed to Xen.
    pub other_ops: u64,
    /// Non-empty flushes by reason, indexed like [`FlushReason::ALL`].
    pub flushes: [u64; 6],
    /// Requests Xen rejected.
    pub rejected: u64,
}

impl Counters {
    pub fn flushes_for(&self, reason: FlushReason) -> u64 {
        self.flushes[reason as usize]
    }

    /// What happened between `earlier` (a snapshot of the same counters) and `self`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut flushes = [0; 6];
        for (d, (now, then)) in flushes
            .iter_mut()
            .zip(self.flushes.iter().zip(&earlier.flushes))
        {
            *d = now - then;
        }
        Counters {
            hypercalls: self.hypercalls - earlier.hypercalls,
            multicalls: self.multicalls - earlier.multicalls,
            multicall_entries: self.multicall_entries - earlier.multicall_entries,
            requests: self.requests - earlier.requests,
            other_ops: self.other_ops - earlier.other_ops,
            flushes,
            rejected: self.rejected - earlier.rejected,
        }
    }
}

/// One request Xen refused, with everything needed to find it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Index of the multicall entry in its flush (0 for a direct hypercall).
    pub entry: u16,
    /// Index of the request inside that entry (`mmu_update` only; 0 otherwise).
    pub request: u32,
    /// The hypercall that carried it.
    pub op: Entry,
    /// Virtual address the entry maps (0 if unknown, e.g. a page-table hook).
    pub va: u64,
    /// Machine address of the page-table entry (or the op's frame/address argument).
    pub ptr: u64,
    /// The value that was to be written.
    pub val: u64,
    pub error: XenError,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "entry {} request {}: {:?} va {:#x} pte maddr {:#x} new value {:#x}: Xen error {}",
            self.entry, self.request, self.op, self.va, self.ptr, self.val, self.error
        )
    }
}

/// How many rejected requests of one flush are kept for [`LazyMmu::last_rejections`] (the
/// count covers all).
pub const MAX_REPORTED: usize = 8;

/// A flush in which Xen refused some requests. Every other request of the batch took effect
/// (the ones after a refused `mmu_update` request were resubmitted). The error carries the
/// first refusal; [`LazyMmu::last_rejections`] lists up to [`MAX_REPORTED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushFailure {
    pub reason: FlushReason,
    pub count: u32,
    pub first: Rejected,
}

impl fmt::Display for FlushFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} request(s) rejected in a {} flush; first: {}",
            self.count,
            self.reason.name(),
            self.first
        )
    }
}

/// Refusals collected since they were last reported.
#[derive(Clone, Copy)]
struct Rejections {
    list: [Option<Rejected>; MAX_REPORTED],
    count: u32,
    /// The flush in which the first listed refusal happened.
    reason: FlushReason,
    /// Xen refused a whole multicall (its entries were then issued one by one).
    multicall_refused: Option<XenError>,
}

impl Rejections {
    const NONE: Rejections = Rejections {
        list: [None; MAX_REPORTED],
        count: 0,
        reason: FlushReason::Explicit,
        multicall_refused: None,
    };

    fn push(&mut self, r: Rejected) {
        if let Some(slot) = self.list.get_mut(self.count as usize) {
            *slot = Some(r);
        }
        self.count += 1;
    }

    fn first(&self) -> Option<Rejected> {
        self.list[0]
    }

    /// Add the refusals of a later flush made for `reason`.
    fn merge(&mut self, later: &Rejections, reason: FlushReason) {
        if self.count == 0 {
            self.reason = reason;
        }
        for r in later.list.iter().flatten() {
            self.push(*r);
        }
        // Refusals beyond the listed ones still count.
        self.count += later.count - later.list.iter().flatten().count() as u32;
        self.multicall_refused = self.multicall_refused.or(later.multicall_refused);
    }

    fn as_error(&self) -> Option<MmuError> {
        match (self.first(), self.multicall_refused) {
            (Some(first), _) => Some(MmuError::Flush(FlushFailure {
                reason: self.reason,
                count: self.count,
                first,
            })),
            (None, Some(e)) => Some(MmuError::MulticallRejected(e)),
            (None, None) => None,
        }
    }
}

/// Which rule of `set_ptes()`'s contract a call broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetPtesRule {
    /// `nr` must be at least 1.
    ZeroCount,
    /// `addr` must be page aligned.
    UnalignedAddress { addr: u64 },
    /// `ptep` must be the machine address of an 8-byte entry.
    UnalignedPtep { ptep: u64 },
    /// All `nr` entries must lie in one L1 table.
    CrossesTable { first_index: u64, nr: u64 },
    /// `ptep` must be the entry that maps `addr`.
    PtepMismatch { addr_index: u64, ptep_index: u64 },
    /// The frames `first_pfn..first_pfn + nr` must all belong to the domain.
    FramesBeyondDomain {
        first_pfn: u64,
        nr: u64,
        nr_pages: u64,
    },
}

impl fmt::Display for SetPtesRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SetPtesRule::ZeroCount => write!(f, "set_ptes: nr must be >= 1 (got 0)"),
            SetPtesRule::UnalignedAddress { addr } => {
                write!(f, "set_ptes: addr {addr:#x} is not page aligned")
            }
            SetPtesRule::UnalignedPtep { ptep } => {
                write!(f, "set_ptes: ptep {ptep:#x} is not 8-byte aligned")
            }
            SetPtesRule::CrossesTable { first_index, nr } => write!(
                f,
                "set_ptes: {nr} entries from index {first_index} cross the end of the L1 table (512 entries)"
            ),
            SetPtesRule::FramesBeyondDomain {
                first_pfn,
                nr,
                nr_pages,
            } => write!(
                f,
                "set_ptes: frames {first_pfn:#x}..{:#x} run past the domain's {nr_pages:#x} pages",
                first_pfn + nr
            ),
            SetPtesRule::PtepMismatch {
                addr_index,
                ptep_index,
            } => write!(
                f,
                "set_ptes: ptep is entry {ptep_index} of its table but addr needs entry {addr_index}"
            ),
        }
    }
}

/// Errors of the lazy-MMU API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuError {
    /// Xen refused requests during a flush (the rest took effect).
    Flush(FlushFailure),
    /// Xen refused a request issued at once (outside lazy mode).
    Immediate(Rejected),
    /// Xen rejected a whole multicall; its entries were then issued one by one.
    MulticallRejected(XenError),
    /// `leave()` without a matching `enter()`.
    UnbalancedLeave,
    /// `resume()` without a matching `pause()`.
    UnbalancedResume,
    /// A nested `enter()` in strict mode (the pre-fix behaviour, where Linux hit `BUG()`).
    NestedEnter { depth: u32 },
    /// `set_ptes()` contract violation; nothing was queued.
    SetPtes(SetPtesRule),
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::Flush(e) => write!(f, "{e}"),
            MmuError::Immediate(r) => write!(f, "immediate update rejected: {r}"),
            MmuError::MulticallRejected(e) => write!(f, "multicall rejected by Xen: {e}"),
            MmuError::UnbalancedLeave => {
                write!(
                    f,
                    "unbalanced lazy MMU leave: leave() without a matching enter()"
                )
            }
            MmuError::UnbalancedResume => {
                write!(
                    f,
                    "unbalanced lazy MMU resume: resume() without a matching pause()"
                )
            }
            MmuError::NestedEnter { depth } => {
                write!(f, "BUG: nested lazy MMU enter (depth {depth}, lazy=strict)")
            }
            MmuError::SetPtes(rule) => write!(f, "{rule}"),
        }
    }
}

/// The fixed-size per-vCPU batch: `E` multicall entries, `R` `mmu_update` requests.
pub struct Queue<const E: usize, const R: usize> {
    entries: [Entry; E],
    n_entries: usize,
    reqs: [MmuUpdate; R],
    /// Virtual address each request maps, for error reports (0 if not a leaf mapping).
    req_va: [u64; R],
    n_reqs: usize,
    /// Bounds of the queued requests' machine addresses: a quick "no hazard" answer.
    ptr_lo: u64,
    ptr_hi: u64,
}

impl<const E: usize, const R: usize> Queue<E, R> {
    const _CAPACITY_OK: () = assert!(
        E >= 1 && R >= 1 && R <= u16::MAX as usize && (R as u64) < MMU_UPDATE_PREEMPTED as u64
    );

    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let _ = Self::_CAPACITY_OK;
        Queue {
            entries: [Entry::MmuUpdate { first: 0, count: 0 }; E],
            n_entries: 0,
            reqs: [MmuUpdate { ptr: 0, val: 0 }; R],
            req_va: [0; R],
            n_reqs: 0,
            ptr_lo: u64::MAX,
            ptr_hi: 0,
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

    /// Bytes of this buffer (its memory cost per vCPU).
    pub const fn footprint() -> usize {
        core::mem::size_of::<Self>()
    }

    fn has_room_for_request(&self) -> bool {
        if self.n_reqs == R {
            return false;
        }
        self.coalesces() || self.n_entries < E
    }

    fn coalesces(&self) -> bool {
        matches!(
            self.entries[..self.n_entries].last(),
            Some(Entry::MmuUpdate { .. })
        )
    }

    fn push_request(&mut self, req: MmuUpdate, va: u64) {
        debug_assert!(self.has_room_for_request());
        let at = self.n_reqs;
        self.reqs[at] = req;
        self.req_va[at] = va;
        self.n_reqs += 1;
        let ptr = req.ptr & !7;
        self.ptr_lo = self.ptr_lo.min(ptr);
        self.ptr_hi = self.ptr_hi.max(ptr);
        if let Some(Entry::MmuUpdate { count, .. }) = self.entries[..self.n_entries].last_mut() {
            *count += 1;
        } else {
            self.entries[self.n_entries] = Entry::MmuUpdate {
                first: at as u16,
                count: 1,
            };
            self.n_entries += 1;
        }
    }

    fn push_entry(&mut self, entry: Entry) {
        debug_assert!(self.n_entries < E);
        self.entries[self.n_entries] = entry;
        self.n_entries += 1;
    }

    /// Is there a queued write to the entry at `ptr`, or a queued op that may change any entry?
    fn has_write_to(&self, ptr: u64) -> bool {
        let ptr = ptr & !7;
        let pending_va_update = self
            .entries()
            .iter()
            .any(|e| matches!(e, Entry::UpdateVaMapping { .. }));
        pending_va_update
            || (ptr >= self.ptr_lo
                && ptr <= self.ptr_hi
                && self.requests().iter().any(|r| r.ptr & !7 == ptr))
    }

    fn clear(&mut self) {
        self.n_entries = 0;
        self.n_reqs = 0;
        self.ptr_lo = u64::MAX;
        self.ptr_hi = 0;
    }
}

impl<const E: usize, const R: usize> Default for Queue<E, R> {
    fn default() -> Self {
        Self::new()
    }
}

/// Linux's multicall buffer sizes (arch/x86/xen/multicalls.h: 32 entries, 512 bytes of
/// arguments, i.e. 32 `mmu_update` requests).
pub const LINUX_ENTRIES: usize = 32;
pub const LINUX_REQUESTS: usize = 32;

/// Our default sizes: one batch covers two full L1 tables.
pub const DEFAULT_ENTRIES: usize = 64;
pub const DEFAULT_REQUESTS: usize = 1024;

/// The lazy-MMU state of one vCPU and its batch.
pub struct LazyMmu<
    H: Hypervisor,
    const E: usize = DEFAULT_ENTRIES,
    const R: usize = DEFAULT_REQUESTS,
> {
    hv: H,
    /// Enable count (Linux: `lazy_mmu_state.enable_count`).
    depth: u32,
    /// Pause count (Linux: `lazy_mmu_state.pause_count`).
    paused: u32,
    strict: bool,
    queue: Queue<E, R>,
    counters: Counters,
    /// Refusals of flushes that report later (full, read hazard, nested leave).
    pending: Rejections,
    last_rejections: Rejections,
}

impl<H: Hypervisor, const E: usize, const R: usize> LazyMmu<H, E, R> {
    pub const fn new(hv: H) -> Self {
        LazyMmu {
            hv,
            depth: 0,
            paused: 0,
            strict: false,
            queue: Queue::new(),
            counters: Counters {
                hypercalls: 0,
                multicalls: 0,
                multicall_entries: 0,
                requests: 0,
                other_ops: 0,
                flushes: [0; 6],
                rejected: 0,
            },
            pending: Rejections::NONE,
            last_rejections: Rejections::NONE,
        }
    }

    /// Strict mode: a nested enter is an error, as in Linux 6.6-rc's `paravirt_enter_lazy_mmu`.
    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// Batching now? (entered and not paused)
    pub fn is_active(&self) -> bool {
        self.depth > 0 && self.paused == 0
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    pub fn is_paused(&self) -> bool {
        self.paused > 0
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn hypervisor(&self) -> &H {
        &self.hv
    }

    pub fn hypervisor_mut(&mut self) -> &mut H {
        &mut self.hv
    }

    /// The requests Xen refused in the last flush or immediate update that had refusals (up to
    /// [`MAX_REPORTED`]; the error's count says how many there were).
    pub fn last_rejections(&self) -> impl Iterator<Item = &Rejected> {
        self.last_rejections.list.iter().flatten()
    }

    /// Queued entries (for tests).
    pub fn queued_entries(&self) -> usize {
        self.queue.n_entries
    }

    /// Queued `mmu_update` requests (for tests).
    pub fn queued_requests(&self) -> usize {
        self.queue.n_reqs
    }

    /// Enter lazy mode (Linux: `lazy_mmu_mode_enable`).
    pub fn enter(&mut self) -> Result<(), MmuError> {
        if self.paused > 0 {
            return Ok(());
        }
        if self.depth > 0 && self.strict {
            return Err(MmuError::NestedEnter { depth: self.depth });
        }
        self.depth += 1;
        Ok(())
    }

    /// Leave lazy mode (Linux: `lazy_mmu_mode_disable`): always flushes; only the outermost
    /// leave ends batching.
    pub fn leave(&mut self) -> Result<(), MmuError> {
        if self.paused > 0 {
            return Ok(());
        }
        if self.depth == 0 {
            return Err(MmuError::UnbalancedLeave);
        }
        let reason = if self.depth == 1 {
            FlushReason::Leave
        } else {
            FlushReason::NestedLeave
        };
        self.depth -= 1;
        if self.depth > 0 {
            // Refusals are reported where batching ends: the outermost leave, or a flush or
            // pause the caller asked for. A nested leave (e.g. the end of `set_ptes()` inside
            // `move_ptes()`) must not hand the outer section's refusals to the inner caller.
            self.flush_deferred(reason);
            return Ok(());
        }
        self.flush_reported(reason)
    }

    /// Issue whatever is queued (Linux: `arch_flush_lazy_mmu_mode`).
    pub fn flush(&mut self) -> Result<(), MmuError> {
        self.flush_reported(FlushReason::Explicit)
    }

    /// Suspend batching, flushing first (Linux: `lazy_mmu_mode_pause`).
    pub fn pause(&mut self) -> Result<(), MmuError> {
        self.paused += 1;
        if self.paused == 1 && self.depth > 0 {
            return self.flush_reported(FlushReason::Pause);
        }
        Ok(())
    }

    /// Pick batching up again at the depth it had (Linux: `lazy_mmu_mode_resume`).
    pub fn resume(&mut self) -> Result<(), MmuError> {
        if self.paused == 0 {
            return Err(MmuError::UnbalancedResume);
        }
        self.paused -= 1;
        Ok(())
    }

    /// Write `val` to the page-table entry at machine address `ptr`, which maps `va` (0 if it
    /// is not a leaf mapping). Queued in lazy mode (refusals are reported by the call that ends
    /// the batching), issued at once otherwise (a refusal is this call's error).
    pub fn set_pte(&mut self, ptr: u64, val: u64, va: u64) -> Result<(), MmuError> {
        let req = pt_update(ptr, val);
        if !self.is_active() {
            return self.issue_now(Entry::MmuUpdate { first: 0, count: 1 }, &[req], va);
        }
        if !self.queue.has_room_for_request() {
            self.flush_deferred(FlushReason::Full);
        }
        self.queue.push_request(req, va);
        Ok(())
    }

    /// Queue (or issue) an `mmuext_op`, e.g. a pin or a TLB flush.
    pub fn mmuext(&mut self, op: MmuextOp) -> Result<(), MmuError> {
        self.queue_other(Entry::Mmuext(op))
    }

    /// Queue (or issue) an `update_va_mapping`.
    pub fn update_va_mapping(&mut self, va: u64, val: u64, flags: u64) -> Result<(), MmuError> {
        self.queue_other(Entry::UpdateVaMapping { va, val, flags })
    }

    /// Read the entry at `ptr`, flushing first if a queued write could change it (refusals of
    /// that flush are reported where the batching ends).
    pub fn read_pte(&mut self, ptr: u64) -> u64 {
        if self.queue.has_write_to(ptr) {
            self.flush_deferred(FlushReason::ReadHazard);
        }
        self.hv.read_pte(ptr)
    }

    /// Linux's generic `set_ptes()`: enter lazy mode, `set_pte` each of `nr` entries starting at
    /// `ptep` (mapping `addr`, `addr + 4096`, ...) with the value `pte_at(i)`, leave. The
    /// contract is checked before anything is queued.
    pub fn set_ptes(
        &mut self,
        addr: u64,
        ptep: u64,
        nr: u64,
        pte_at: impl Fn(u64) -> u64,
    ) -> Result<(), MmuError> {
        check_set_ptes(addr, ptep, nr).map_err(MmuError::SetPtes)?;
        self.enter()?;
        for i in 0..nr {
            // Inside the section just entered every write is queued: no error can come back.
            self.set_pte(ptep + i * 8, pte_at(i), addr + i * PAGE_SIZE)?;
        }
        self.leave()
    }

    fn queue_other(&mut self, entry: Entry) -> Result<(), MmuError> {
        if !self.is_active() {
            return self.issue_now(entry, &[], 0);
        }
        if self.queue.n_entries == E {
            self.flush_deferred(FlushReason::Full);
        }
        self.queue.push_entry(entry);
        Ok(())
    }

    /// Outside lazy mode: one hypercall for one operation.
    fn issue_now(&mut self, entry: Entry, reqs: &[MmuUpdate], va: u64) -> Result<(), MmuError> {
        let mut failure = Rejections::NONE;
        let mut issuer = Issuer {
            hv: &mut self.hv,
            counters: &mut self.counters,
        };
        issuer.issue_entry(0, entry, reqs, &[va], &mut failure);
        self.record(&failure);
        match failure.first() {
            Some(r) => Err(MmuError::Immediate(r)),
            None => Ok(()),
        }
    }

    fn record(&mut self, failure: &Rejections) {
        self.counters.rejected += failure.count as u64;
        if failure.count > 0 {
            self.last_rejections = *failure;
        }
    }

    /// Flush; keep any refusals for the call that ends the batching.
    fn flush_deferred(&mut self, reason: FlushReason) {
        let failure = self.flush_queue(reason);
        self.pending.merge(&failure, reason);
    }

    /// Flush; report this flush's refusals and any kept from earlier flushes.
    fn flush_reported(&mut self, reason: FlushReason) -> Result<(), MmuError> {
        let failure = self.flush_queue(reason);
        let mut all = core::mem::replace(&mut self.pending, Rejections::NONE);
        all.merge(&failure, reason);
        if all.count > 0 {
            self.last_rejections = all;
        }
        match all.as_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Issue the queue: directly if it holds one entry, as one multicall otherwise; then check
    /// every result, reissue what a refused request held up, and empty the queue.
    fn flush_queue(&mut self, reason: FlushReason) -> Rejections {
        let mut failure = Rejections::NONE;
        if self.queue.is_empty() {
            return failure;
        }
        self.counters.flushes[reason as usize] += 1;
        let queue = &self.queue;
        let mut issuer = Issuer {
            hv: &mut self.hv,
            counters: &mut self.counters,
        };
        let (entries, reqs, vas) = (
            queue.entries(),
            queue.requests(),
            &queue.req_va[..queue.n_reqs],
        );
        if let [entry] = entries {
            issuer.issue_entry(0, *entry, reqs, vas, &mut failure);
        } else {
            let mut outcomes = [EntryOutcome::default(); E];
            let outcomes = &mut outcomes[..entries.len()];
            issuer.count_multicall(entries);
            match issuer.hv.multicall(entries, reqs, outcomes) {
                Ok(()) => issuer.check_outcomes(entries, reqs, vas, outcomes, &mut failure),
                Err(e) => {
                    // Xen could not run the list as a whole: issue the entries one by one so
                    // that nothing is lost.
                    failure.multicall_refused = Some(e);
                    for (i, entry) in entries.iter().enumerate() {
                        issuer.issue_entry(i as u16, *entry, reqs, vas, &mut failure);
                    }
                }
            }
        }
        self.queue.clear();
        self.counters.rejected += failure.count as u64;
        failure
    }
}

/// Issues hypercalls for queued entries and keeps the counters.
struct Issuer<'a, H: Hypervisor> {
    hv: &'a mut H,
    counters: &'a mut Counters,
}

impl<H: Hypervisor> Issuer<'_, H> {
    fn count_multicall(&mut self, entries: &[Entry]) {
        self.counters.hypercalls += 1;
        self.counters.multicalls += 1;
        self.counters.multicall_entries += entries.len() as u64;
        for e in entries {
            match e {
                Entry::MmuUpdate { count, .. } => self.counters.requests += *count as u64,
                _ => self.counters.other_ops += 1,
            }
        }
    }

    /// Look at each multicall entry's result and report the refusals. If a refused
    /// `mmu_update` request held up the requests behind it, reissue from there on in queue
    /// order (see below).
    fn check_outcomes(
        &mut self,
        entries: &[Entry],
        reqs: &[MmuUpdate],
        vas: &[u64],
        outcomes: &[EntryOutcome],
        failure: &mut Rejections,
    ) {
        let requests_of = |entry: &Entry| match *entry {
            Entry::MmuUpdate { first, count } => first as usize..first as usize + count as usize,
            _ => 0..0,
        };
        // The first entry whose refusal held up requests behind it, and the first of those.
        let held_up = entries.iter().zip(outcomes).position(|(entry, outcome)| {
            outcome.result < 0 && (outcome.done as usize) + 1 < requests_of(entry).len()
        });
        let settled = held_up.map_or(entries.len(), |i| i + 1);
        for (i, (entry, outcome)) in entries.iter().zip(outcomes).enumerate().take(settled) {
            if outcome.result >= 0 {
                continue;
            }
            let error = XenError::from_errno(outcome.result);
            let range = requests_of(entry);
            let at = (outcome.done as usize).min(range.len().saturating_sub(1));
            let (req, va) = match *entry {
                Entry::MmuUpdate { .. } => (reqs[range.start + at], vas[range.start + at]),
                Entry::UpdateVaMapping { va, .. } => (op_argument(entry), va),
                Entry::Mmuext(_) => (op_argument(entry), 0),
            };
            failure.push(rejection(i as u16, at as u32, *entry, req, va, error));
        }
        let Some(start) = held_up else {
            return;
        };
        // Xen stopped that `mmu_update` at the refused request but ran every later entry, so
        // the held-up requests alone would land after them: a later write to the same entry
        // would be undone, a later TLB flush would come too early, and a later entry that
        // failed only because the held-up requests had not run would stay failed. So reissue
        // everything from the held-up requests on, one hypercall at a time, in queue order,
        // and report only what fails now. Writes and flushes are idempotent. A pin or unpin
        // that succeeded cannot run twice and is skipped; one that failed is retried.
        let range = requests_of(&entries[start]);
        let from = outcomes[start].done as usize + 1;
        self.submit_updates(
            start as u16,
            entries[start],
            &reqs[range.clone()],
            &vas[range],
            from,
            failure,
        );
        for (i, (entry, outcome)) in entries.iter().zip(outcomes).enumerate().skip(start + 1) {
            match *entry {
                Entry::Mmuext(op) if op.cmd <= MMUEXT_UNPIN_TABLE && outcome.result >= 0 => {}
                _ => self.issue_entry(i as u16, *entry, reqs, vas, failure),
            }
        }
    }

    /// Issue one entry as its own hypercall, recording refusals. `reqs`/`vas` hold the requests
    /// an `mmu_update` entry points into.
    fn issue_entry(
        &mut self,
        index: u16,
        entry: Entry,
        reqs: &[MmuUpdate],
        vas: &[u64],
        failure: &mut Rejections,
    ) {
        match entry {
            Entry::MmuUpdate { first, count } => {
                let range = first as usize..first as usize + count as usize;
                self.submit_updates(index, entry, &reqs[range.clone()], &vas[range], 0, failure);
            }
            Entry::Mmuext(op) => {
                self.counters.hypercalls += 1;
                self.counters.other_ops += 1;
                if let Err(e) = self.hv.mmuext_op(&[op]) {
                    failure.push(rejection(index, 0, entry, op_argument(&entry), 0, e.error));
                }
            }
            Entry::UpdateVaMapping { va, val, flags } => {
                self.counters.hypercalls += 1;
                self.counters.other_ops += 1;
                if let Err(e) = self.hv.update_va_mapping(va, val, flags) {
                    failure.push(rejection(index, 0, entry, op_argument(&entry), va, e));
                }
            }
        }
    }

    /// `mmu_update` of `reqs[from..]`, resubmitting after each refused request until all ran.
    fn submit_updates(
        &mut self,
        index: u16,
        entry: Entry,
        reqs: &[MmuUpdate],
        vas: &[u64],
        mut from: usize,
        failure: &mut Rejections,
    ) {
        while from < reqs.len() {
            self.counters.hypercalls += 1;
            self.counters.requests += (reqs.len() - from) as u64;
            match self.hv.mmu_update(&reqs[from..]) {
                Ok(()) => break,
                Err(PartialFailure { done, error }) => {
                    let at = (from + done as usize).min(reqs.len() - 1);
                    failure.push(rejection(index, at as u32, entry, reqs[at], vas[at], error));
                    from = at + 1;
                }
            }
        }
    }
}

/// The (pointer, value) pair a report shows for a non-`mmu_update` entry.
fn op_argument(entry: &Entry) -> MmuUpdate {
    match *entry {
        Entry::MmuUpdate { .. } => MmuUpdate { ptr: 0, val: 0 },
        Entry::Mmuext(op) => MmuUpdate {
            ptr: mmuext_arg1(&op),
            val: 0,
        },
        Entry::UpdateVaMapping { val, .. } => MmuUpdate { ptr: 0, val },
    }
}

fn rejection(
    entry: u16,
    request: u32,
    op: Entry,
    req: MmuUpdate,
    va: u64,
    error: XenError,
) -> Rejected {
    Rejected {
        entry,
        request,
        op,
        va,
        ptr: req.ptr & !7,
        val: req.val,
        error,
    }
}

/// `set_ptes()`'s contract: `nr >= 1`, `addr` page aligned, `ptep` the entry for `addr`, and all
/// `nr` entries inside one L1 table.
pub fn check_set_ptes(addr: u64, ptep: u64, nr: u64) -> Result<(), SetPtesRule> {
    if nr == 0 {
        return Err(SetPtesRule::ZeroCount);
    }
    if !addr.is_multiple_of(PAGE_SIZE) {
        return Err(SetPtesRule::UnalignedAddress { addr });
    }
    if !ptep.is_multiple_of(8) {
        return Err(SetPtesRule::UnalignedPtep { ptep });
    }
    let ptep_index = (ptep % PAGE_SIZE) / 8;
    let addr_index = (addr / PAGE_SIZE) % ENTRIES_PER_TABLE;
    if ptep_index != addr_index {
        return Err(SetPtesRule::PtepMismatch {
            addr_index,
            ptep_index,
        });
    }
    if ptep_index + nr > ENTRIES_PER_TABLE {
        return Err(SetPtesRule::CrossesTable {
            first_index: ptep_index,
            nr,
        });
    }
    Ok(())
}
