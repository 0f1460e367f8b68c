//! The lazy-MMU state machine over one vCPU's batch.
//!
//! It mirrors Linux's generic lazy MMU mode (include/linux/pgtable.h since the 2025 rework:
//! `lazy_mmu_mode_enable/disable/pause/resume` over `lazy_mmu_state`, an enable count and a
//! pause count):
//!
//! * the outermost [`enter`](LazyMmu::enter) starts batching; a nested one only counts;
//! * a nested [`leave`](LazyMmu::leave) **flushes** and stays lazy; the outermost leave flushes
//!   and ends batching. (In 2023 generic `set_ptes()` began to enter lazy mode inside
//!   `move_ptes()`'s lazy section; x86 PV's `BUG_ON` on a nested enter killed every Xen PV
//!   guest. `strict` mode keeps that behaviour so that it can be demonstrated.)
//! * [`pause`](LazyMmu::pause) flushes and suspends batching, [`resume`](LazyMmu::resume) picks
//!   it up again at the same depth; pauses nest, and enter/leave while paused do nothing.
//!
//! What the caller sees never depends on the batching: the tables after a call that ends the
//! batching, and the refusals it reports, are those of issuing every request at once, in order.

use hypercalls::abi::MmuUpdate;
use hypercalls::addr::{ENTRIES_PER_TABLE, ENTRY_SIZE};
use hypercalls::{MachAddr, PAGE_SIZE, Pte};
use x86_64::VirtAddr;

use crate::counters::{Counters, FlushReason};
use crate::hypervisor::Hypervisor;
use crate::queue::{DEFAULT_ENTRIES, DEFAULT_REQUESTS, Queue};
use crate::report::{Collected, MmuError, Refusal, SetPtesRule};
use crate::request::{Request, TableOp};
use crate::rules::{IrqRule, Rules};

/// Deepest nesting of sections, and of pauses (Linux keeps both counts in a `u8` and warns
/// when one would wrap).
pub const NESTING_LIMIT: u32 = u8::MAX as u32;

/// Whether a call that ends batching reports the refusals or keeps them for a later one.
#[derive(Clone, Copy)]
enum Report {
    Now,
    Later,
}

/// The lazy-MMU state of one flow of control (Linux: `task_struct::lazy_mmu_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LazyState {
    /// Enable count: how deeply lazy sections nest.
    pub enable: u8,
    /// Pause count.
    pub pause: u8,
}

impl LazyState {
    /// Batching now? (inside a section and not paused)
    pub fn is_active(self) -> bool {
        self.enable > 0 && self.pause == 0
    }
}

/// One vCPU's lazy-MMU state and batch, over a [`Hypervisor`].
pub struct LazyMmu<
    H: Hypervisor,
    const E: usize = DEFAULT_ENTRIES,
    const R: usize = DEFAULT_REQUESTS,
> {
    pub(crate) hv: H,
    pub(crate) state: LazyState,
    strict: bool,
    pub(crate) queue: Queue<E, R>,
    pub(crate) counters: Counters,
    /// Refusals of flushes that report later (full, read hazard, nested leave, type change).
    pub(crate) pending: Collected,
    last: Collected,
    /// Nesting of interrupt handlers on this vCPU.
    pub(crate) irq_depth: u8,
    pub(crate) rules: Rules,
}

/// `clone_from` reuses the batch's arrays and copies only their used part (see [`Queue`]).
impl<H: Hypervisor + Clone, const E: usize, const R: usize> Clone for LazyMmu<H, E, R> {
    fn clone(&self) -> Self {
        LazyMmu {
            hv: self.hv.clone(),
            queue: self.queue.clone(),
            ..*self
        }
    }

    fn clone_from(&mut self, src: &Self) {
        self.hv.clone_from(&src.hv);
        self.queue.clone_from(&src.queue);
        self.state = src.state;
        self.strict = src.strict;
        self.counters = src.counters;
        self.pending = src.pending;
        self.last = src.last;
        self.irq_depth = src.irq_depth;
        self.rules = src.rules;
    }
}

impl<H: Hypervisor, const E: usize, const R: usize> LazyMmu<H, E, R> {
    pub const fn new(hv: H) -> Self {
        LazyMmu {
            hv,
            state: LazyState {
                enable: 0,
                pause: 0,
            },
            strict: false,
            queue: Queue::new(),
            counters: Counters::ZERO,
            pending: Collected::NONE,
            last: Collected::NONE,
            irq_depth: 0,
            rules: Rules::LINUX,
        }
    }

    /// Strict mode: a nested enter is an error, as in Linux 6.6-rc's `paravirt_enter_lazy_mmu`.
    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    pub fn is_strict(&self) -> bool {
        self.strict
    }

    pub fn state(&self) -> LazyState {
        self.state
    }

    /// Batching now? (entered, not paused, and not in an interrupt handler)
    #[inline]
    pub fn is_active(&self) -> bool {
        self.state.is_active() && !self.lazy_off_in_irq()
    }

    /// In an interrupt handler lazy mode is off and the section calls do nothing (Linux:
    /// `in_interrupt()` in `lazy_mmu_mode_*` and `xen_get_lazy_mode()`).
    #[inline]
    fn lazy_off_in_irq(&self) -> bool {
        self.irq_depth > 0 && self.rules.irq == IrqRule::Immediate
    }

    pub fn depth(&self) -> u32 {
        self.state.enable as u32
    }

    pub fn is_paused(&self) -> bool {
        self.state.pause > 0
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

    /// The refusals of the last report (up to [`crate::MAX_REPORTED`]; its count says how many
    /// there were).
    pub fn last_refusals(&self) -> impl Iterator<Item = &Refusal> {
        self.last.list.iter().flatten()
    }

    /// Queued entries.
    pub fn queued_entries(&self) -> usize {
        self.queue.entries().len()
    }

    /// Queued `mmu_update` requests.
    pub fn queued_requests(&self) -> usize {
        self.queue.requests().len()
    }

    /// Refusals held for the call that ends the batching.
    pub fn pending_refusals(&self) -> u32 {
        self.pending.count
    }

    /// Enter lazy mode (Linux: `lazy_mmu_mode_enable`).
    pub fn enter(&mut self) -> Result<(), MmuError> {
        if self.state.pause > 0 || self.lazy_off_in_irq() {
            return Ok(());
        }
        if self.state.enable > 0 && self.strict {
            return Err(MmuError::NestedEnter {
                depth: self.depth(),
            });
        }
        self.state.enable = self
            .state
            .enable
            .checked_add(1)
            .ok_or(MmuError::NestingLimit { what: "enter" })?;
        Ok(())
    }

    /// Leave lazy mode (Linux: `lazy_mmu_mode_disable`): always flushes; only the outermost
    /// leave ends batching and reports the refusals.
    pub fn leave(&mut self) -> Result<(), MmuError> {
        self.leave_with(Report::Now)
    }

    /// Leave, keeping any refusals for the next call that reports (for a section dropped on
    /// an error path, which has nobody to report to).
    pub fn leave_deferring(&mut self) -> Result<(), MmuError> {
        self.leave_with(Report::Later)
    }

    fn leave_with(&mut self, report: Report) -> Result<(), MmuError> {
        if self.state.pause > 0 || self.lazy_off_in_irq() {
            return Ok(());
        }
        self.state.enable = self
            .state
            .enable
            .checked_sub(1)
            .ok_or(MmuError::UnbalancedLeave)?;
        if self.state.enable > 0 {
            // A nested leave (e.g. the end of `set_ptes()` inside `move_ptes()`) must not hand
            // the outer section's refusals to the inner caller.
            self.flush_deferred(FlushReason::NestedLeave);
            return Ok(());
        }
        self.flush_for(FlushReason::Leave, report)
    }

    /// Issue whatever is queued (Linux: `arch_flush_lazy_mmu_mode`); report every refusal
    /// held so far.
    pub fn flush(&mut self) -> Result<(), MmuError> {
        if self.lazy_off_in_irq() {
            // Nothing of the handler's is queued; the batch is the interrupted code's.
            return Ok(());
        }
        self.flush_reported(FlushReason::Explicit)
    }

    /// Suspend batching, flushing first (Linux: `lazy_mmu_mode_pause`).
    pub fn pause(&mut self) -> Result<(), MmuError> {
        self.pause_with(Report::Now)
    }

    /// [`LazyMmu::pause`] whose flush keeps its refusals for the call that ends the batching
    /// (for code that must issue requests of its own at once, inside someone else's section,
    /// without reporting that section's refusals: a region's teardown).
    pub fn pause_deferring(&mut self) -> Result<(), MmuError> {
        self.pause_with(Report::Later)
    }

    fn pause_with(&mut self, report: Report) -> Result<(), MmuError> {
        if self.lazy_off_in_irq() {
            return Ok(());
        }
        self.state.pause = self
            .state
            .pause
            .checked_add(1)
            .ok_or(MmuError::NestingLimit { what: "pause" })?;
        if self.state.pause == 1 && self.state.enable > 0 {
            return self.flush_for(FlushReason::Pause, report);
        }
        Ok(())
    }

    /// Pick batching up again at the depth it had (Linux: `lazy_mmu_mode_resume`).
    pub fn resume(&mut self) -> Result<(), MmuError> {
        if self.lazy_off_in_irq() {
            return Ok(());
        }
        self.state.pause = self
            .state
            .pause
            .checked_sub(1)
            .ok_or(MmuError::UnbalancedResume)?;
        Ok(())
    }

    /// Write `val` to the leaf (L1) entry at `ptr`, which maps `va`. Queued in lazy mode
    /// (refusals are reported by the call that ends the batching), issued at once otherwise
    /// (a refusal is this call's error).
    #[inline]
    pub fn set_pte(&mut self, ptr: MachAddr, val: Pte, va: VirtAddr) -> Result<(), MmuError> {
        // The common case, one more write to the open `mmu_update` entry, first.
        if self.is_active() && ptr.is_entry_aligned() && self.queue.try_append(ptr, val, va) {
            return Ok(());
        }
        self.write(ptr, val, Some(va))
    }

    /// Write `val` to the upper-level (L2..L4) entry at `ptr`: hook or unhook a table. This
    /// changes page types; see [`LazyMmu::before_type_change`].
    pub fn set_table_entry(&mut self, ptr: MachAddr, val: Pte) -> Result<(), MmuError> {
        self.before_type_change();
        self.write(ptr, val, None)
    }

    /// A request that changes page types must run exactly in queue order: not before requests
    /// queued ahead of it (in a multicall, requests held up behind a refused one in the same
    /// entry run after all later entries) and not after later ones. So it starts an entry of
    /// its own (never held up itself), and if any queued entry holds several requests, the
    /// queue is issued first ([`FlushReason::TypeChange`]). Pins and hooks right after single
    /// requests (e.g. a new table's remap, pin and hook) still share one multicall.
    fn before_type_change(&mut self) {
        if self.is_active() && self.queue.may_hold_up() {
            self.flush_deferred(FlushReason::TypeChange);
        }
    }

    fn write(&mut self, ptr: MachAddr, val: Pte, va: Option<VirtAddr>) -> Result<(), MmuError> {
        // The low bits of an `mmu_update` pointer are its command: an unaligned entry address
        // would become another command (e.g. an M2P update), never a page-table write.
        if !ptr.is_entry_aligned() {
            return Err(MmuError::UnalignedPtr { ptr });
        }
        if !self.is_active() {
            let req = hypercalls::abi::pt_update(ptr, val);
            let request = match va {
                Some(va) => Request::SetPte { ptr, val, va },
                None => Request::SetTableEntry { ptr, val },
            };
            let mut refused = Collected::new(None);
            self.issue_now(&[req], |i| (i, request), &mut refused);
            return self.report_now(refused);
        }
        if !self.queue.has_room_for_request(va.is_none()) {
            self.flush_deferred(FlushReason::Full);
        }
        self.queue.push_request(ptr, val, va);
        Ok(())
    }

    /// Queue (or issue) a table operation: a pin or unpin (which changes page types, so
    /// whatever is queued is issued first), or a TLB operation.
    pub fn table_op(&mut self, op: TableOp) -> Result<(), MmuError> {
        if !self.is_active() {
            let mut refused = Collected::new(None);
            let request = Request::TableOp(op);
            self.issue_now(&[op.to_mmuext()], |i| (i, request), &mut refused);
            return self.report_now(refused);
        }
        if op.changes_types() {
            self.before_type_change();
        }
        if !self.queue.has_room_for_op(op) {
            self.flush_deferred(FlushReason::Full);
        }
        self.queue.push_op(op);
        Ok(())
    }

    /// Queue (or issue) an `update_va_mapping` (a leaf write found by a walk of the current
    /// tables).
    pub fn update_va_mapping(
        &mut self,
        va: VirtAddr,
        val: Pte,
        flags: u64,
    ) -> Result<(), MmuError> {
        if !self.is_active() {
            let mut refused = Collected::new(None);
            self.issue_va_update_now(va, val, flags, &mut refused);
            return self.report_now(refused);
        }
        if !self.queue.has_room_for_entry() {
            self.flush_deferred(FlushReason::Full);
        }
        self.queue.push_va_update(va, val, flags);
        Ok(())
    }

    /// Read the entry at `ptr`, flushing first if a queued write could change it (refusals of
    /// that flush are reported where the batching ends).
    pub fn read_pte(&mut self, ptr: MachAddr) -> Result<Pte, MmuError> {
        if !ptr.is_entry_aligned() {
            return Err(MmuError::UnalignedPtr { ptr });
        }
        if self.queue.may_write(ptr) {
            self.flush_deferred(FlushReason::ReadHazard);
        }
        self.hv
            .read_pte(ptr)
            .map_err(|e| MmuError::NotOwned { ptr: e.ptr })
    }

    /// Linux's generic `set_ptes()`: `nr` consecutive leaf entries from `ptep` (mapping `addr`,
    /// `addr + 4096`, ...) get the values `pte_at(0)`, `pte_at(1)`, ..., inside a lazy section
    /// of their own. The contract is checked before anything is queued. While batching is
    /// paused (or in an interrupt handler) the writes go out at once, as one `mmu_update` that
    /// carries on past refusals, so the outcome is the same as batched.
    pub fn set_ptes(
        &mut self,
        addr: VirtAddr,
        ptep: MachAddr,
        nr: u64,
        pte_at: impl Fn(u64) -> Pte,
    ) -> Result<(), MmuError> {
        check_set_ptes(addr, ptep, nr).map_err(MmuError::SetPtes)?;
        // After the check, every entry lies in ptep's table and every address in addr's 2 MiB
        // block: none of the arithmetic below can overflow.
        let va_at = |i: u64| addr + i * PAGE_SIZE;
        let ptr_at = |i: u64| MachAddr::new_truncate(ptep.get() + i * ENTRY_SIZE);
        if self.is_paused() || self.lazy_off_in_irq() {
            let mut reqs = [MmuUpdate { ptr: 0, val: 0 }; ENTRIES_PER_TABLE as usize];
            for (i, r) in reqs.iter_mut().take(nr as usize).enumerate() {
                *r = hypercalls::abi::pt_update(ptr_at(i as u64), pte_at(i as u64));
            }
            let mut refused = Collected::new(None);
            let name = |i: usize| {
                let i64 = i as u64;
                let (ptr, val, va) = (ptr_at(i64), pte_at(i64), va_at(i64));
                (i, Request::SetPte { ptr, val, va })
            };
            self.issue_now(&reqs[..nr as usize], name, &mut refused);
            return self.report_now(refused);
        }
        self.enter()?;
        for i in 0..nr {
            // Inside the section just entered every write is queued: no error can come back.
            self.set_pte(ptr_at(i), pte_at(i), va_at(i))?;
        }
        self.leave()
    }

    fn report_now(&mut self, refused: Collected) -> Result<(), MmuError> {
        if refused.count > 0 {
            self.last = refused;
        }
        refused.as_error()
    }

    /// Flush; keep any refusals for the call that ends the batching.
    pub(crate) fn flush_deferred(&mut self, reason: FlushReason) {
        let refused = self.flush_queue(reason);
        self.pending.merge(&refused);
    }

    /// Flush, and report now or keep the refusals for the call that ends the batching.
    fn flush_for(&mut self, reason: FlushReason, report: Report) -> Result<(), MmuError> {
        match report {
            Report::Now => self.flush_reported(reason),
            Report::Later => {
                self.flush_deferred(reason);
                Ok(())
            }
        }
    }

    /// Flush; report this flush's refusals and any kept from earlier flushes.
    fn flush_reported(&mut self, reason: FlushReason) -> Result<(), MmuError> {
        let refused = self.flush_queue(reason);
        let mut all = core::mem::replace(&mut self.pending, Collected::NONE);
        all.merge(&refused);
        self.report_now(all)
    }
}

/// `set_ptes()`'s contract: `nr >= 1`, `addr` page aligned, `ptep` an entry address and the
/// entry for `addr`, and all `nr` entries inside one L1 table. Overflow-proof for any input.
pub fn check_set_ptes(addr: VirtAddr, ptep: MachAddr, nr: u64) -> Result<(), SetPtesRule> {
    if nr == 0 {
        return Err(SetPtesRule::ZeroCount);
    }
    if !addr.is_aligned(PAGE_SIZE) {
        return Err(SetPtesRule::UnalignedAddress {
            addr: addr.as_u64(),
        });
    }
    if !ptep.is_entry_aligned() {
        return Err(SetPtesRule::UnalignedPtep { ptep });
    }
    let ptep_index = ptep.entry_index();
    let addr_index = u64::from(addr.p1_index());
    if ptep_index != addr_index {
        return Err(SetPtesRule::PtepMismatch {
            addr_index,
            ptep_index,
        });
    }
    // ptep_index < 512, so the subtraction cannot wrap (unlike `ptep_index + nr`).
    if nr > ENTRIES_PER_TABLE - ptep_index {
        return Err(SetPtesRule::CrossesTable {
            first_index: ptep_index,
            nr,
        });
    }
    Ok(())
}
