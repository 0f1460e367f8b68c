//! The kernel's page-table write path: `set_pte`, `set_ptes`, `ptep_get`, TLB operations and
//! the lazy-MMU section calls, over the per-vCPU [`LazyMmu`] batch and real Xen.
//!
//! Xen checks every page-table write for *Xen's* safety, never for the kernel's: a write that
//! unmaps the stack or maps a frame the heap uses is accepted. So the functions that change
//! live mappings are `unsafe`, and their callers promise what no type can check (Linux's
//! `set_pte` contract): the entries they write are theirs, and no Rust reference relies on
//! what they change. Code that must not be trusted with that (tests, the benchmark) uses an
//! owned [`super::region::Region`] instead. Reading entries, TLB operations and the section
//! calls are safe.
//!
//! PTE values are machine values (Xen PV page tables hold MFNs); `set_ptes` advances frame by
//! frame in pseudo-physical space, as Linux's `pte_next_pfn()` does on Xen PV.

use alloc::vec::Vec;

use hypercalls::abi::UVMF_INVLPG;
use hypercalls::{MachAddr, Pfn, Pte};
use lazy_mmu::{
    Counters, LazyMmu, LazyState, MmuError, Refusal, Rules, SetPtesRule, TableOp, TaskLazy,
    check_set_ptes,
};
use x86_64::VirtAddr;
use x86_64::structures::paging::PageTableFlags;

use super::MmError;
use super::xen_hv::XenHv;
use crate::xen::events::{IrqMutex, IrqMutexGuard};
use crate::xen::{boot_info, p2m};

/// Most vCPUs the per-vCPU state is sized for (the guest brings up one).
pub const MAX_VCPUS: usize = 1;

/// One vCPU's lazy-MMU state behind its lock.
struct PerCpuLazy(IrqMutex<LazyMmu<XenHv>>);

// SAFETY: the only part that is not Send is the raw `vcpumask` pointer inside the union of
// queued `mmuext_op` values; no queued op uses it (`TableOp` has no multi-vCPU flush), and the
// queue only copies the values to Xen.
unsafe impl Sync for PerCpuLazy {}

static LAZY: [PerCpuLazy; MAX_VCPUS] = [PerCpuLazy(IrqMutex::new(LazyMmu::new(XenHv::new())))];

/// The current vCPU's lazy-MMU state, with events masked while it is held (so an upcall never
/// finds it taken, and no task is switched out in the middle of a batch operation). The guest
/// runs on vCPU 0 only.
fn this_cpu() -> IrqMutexGuard<'static, LazyMmu<XenHv>> {
    LAZY[0].0.lock()
}

/// Run `f` on the current vCPU's batch (inside `mm` only: the batch writes live tables).
pub(super) fn with_lazy<T>(f: impl FnOnce(&mut LazyMmu<XenHv>) -> T) -> T {
    f(&mut this_cpu())
}

/// Kernel read-write data mapping. Xen adds USER (a PV kernel runs in ring 3) and its own bit.
pub const KERNEL_RW: PageTableFlags = PageTableFlags::from_bits_truncate(
    PageTableFlags::PRESENT.bits() | PageTableFlags::WRITABLE.bits(),
);
/// Kernel read-only mapping (page-table pages).
pub const KERNEL_RO: PageTableFlags = PageTableFlags::PRESENT;

/// A fatal misuse of the lazy-MMU API is a kernel bug, as `BUG()` is in Linux.
fn bug_on_misuse(result: Result<(), MmuError>) -> Result<(), MmuError> {
    match result {
        Err(e @ MmuError::NestedEnter { .. }) => panic!("{e}"),
        Err(e @ (MmuError::UnbalancedLeave | MmuError::UnbalancedResume)) => panic!("BUG: {e}"),
        other => other,
    }
}

/// Enter a lazy-MMU section. In `lazy=strict` mode a nested enter is a `BUG`; beyond the
/// nesting limit it is refused.
pub fn enter() -> Result<(), MmuError> {
    let r = this_cpu().enter();
    bug_on_misuse(r)
}

/// Leave a lazy-MMU section: flushes (every leave does); the outermost leave stops batching
/// and reports the refusals. An unbalanced leave is a `BUG`.
pub fn leave() -> Result<(), MmuError> {
    let r = this_cpu().leave();
    bug_on_misuse(r)
}

/// Suspend batching (flushing first); [`resume`] picks it up at the same depth.
pub fn pause() -> Result<(), MmuError> {
    this_cpu().pause()
}

/// Suspend batching (flushing first) without reporting: the flush's refusals stay for the call
/// that ends the batching (for a region's teardown inside someone else's section).
pub(super) fn pause_deferring() -> Result<(), MmuError> {
    this_cpu().pause_deferring()
}

/// Issue `reqs` now, outside the batch, judging only their own results (pending refusals stay
/// pending). Only while nothing is queued: the caller paused, or is not in a section.
///
/// # Safety
/// As for [`set_pte`] (and [`set_table_entry`]), for every request.
pub(super) unsafe fn mmu_update_now(reqs: &[hypercalls::abi::MmuUpdate]) -> Result<(), MmError> {
    use lazy_mmu::Hypervisor;
    let mut l = this_cpu();
    debug_assert_eq!(l.queued_entries(), 0);
    l.hypervisor_mut()
        .mmu_update(reqs)
        .map_err(|e| MmError::Xen(e.error))
}

/// [`mmu_update_now`] for table operations (unpins and TLB flushes).
///
/// # Safety
/// An unpinned table must be one the caller owns and has unhooked.
pub(super) unsafe fn table_ops_now(ops: &[TableOp]) -> Result<(), MmError> {
    use lazy_mmu::Hypervisor;
    let ops: Vec<_> = ops.iter().map(|o| o.to_mmuext()).collect();
    let mut l = this_cpu();
    debug_assert_eq!(l.queued_entries(), 0);
    l.hypervisor_mut()
        .mmuext_op(&ops)
        .map_err(|e| MmError::Xen(e.error))
}

/// [`update_va_mapping`] now, outside the batch, judging only its own result.
///
/// # Safety
/// As for [`set_pte`].
pub(super) unsafe fn update_va_mapping_now(va: VirtAddr, pte: Pte) -> Result<(), MmError> {
    use lazy_mmu::Hypervisor;
    this_cpu()
        .hypervisor_mut()
        .update_va_mapping(va, pte, UVMF_INVLPG)
        .map_err(MmError::Xen)
}

/// Resume batching. An unbalanced resume is a `BUG`.
pub fn resume() {
    let r = this_cpu().resume();
    let _ = bug_on_misuse(r);
}

/// Flush the batch now, reporting the refusals not yet reported (Linux: `arch_flush_lazy_mmu_mode`).
pub fn flush() -> Result<(), MmuError> {
    this_cpu().flush()
}

pub fn is_active() -> bool {
    this_cpu().is_active()
}

pub fn depth() -> u32 {
    this_cpu().depth()
}

pub fn counters() -> Counters {
    this_cpu().counters()
}

/// Queued (multicall entries, `mmu_update` requests).
pub fn queued() -> (usize, usize) {
    let l = this_cpu();
    (l.queued_entries(), l.queued_requests())
}

/// The refusals of the last report (up to `lazy_mmu::MAX_REPORTED`).
pub fn last_refusals() -> Vec<Refusal> {
    this_cpu().last_refusals().copied().collect()
}

/// Close any open lazy section and pause (flushing, keeping nothing to report), for the test
/// runner between tests. Returns what was open, if anything.
pub fn reset_lazy_state() -> Option<alloc::string::String> {
    let mut l = this_cpu();
    let (depth, paused) = (l.depth(), l.is_paused());
    if depth == 0 && !paused {
        return None;
    }
    while l.is_paused() {
        let _ = l.resume();
    }
    while l.depth() > 0 {
        let _ = l.leave_deferring();
    }
    // Drop refusals nobody will ask for.
    let _ = l.flush();
    Some(alloc::format!("depth {depth}, paused {paused}"))
}

/// Choose the nesting model (`lazy=strict` restores the pre-fix `BUG` on nested enter).
pub fn set_strict(strict: bool) {
    this_cpu().set_strict(strict);
}

/// A lazy-MMU section that leaves when dropped. [`LazySection::leave`] reports the refusals;
/// a section dropped without it (an error path, a `?`) leaves without reporting: its
/// refusals go to the next call that reports, and the error already in flight is not
/// replaced by a panic.
pub struct LazySection {
    left: bool,
    /// The pause count when the section was entered: a pause taken inside it and still in
    /// force at its leave would make that leave do nothing (Linux's semantics).
    pause: u8,
}

impl LazySection {
    pub fn enter() -> Result<LazySection, MmuError> {
        let mut l = this_cpu();
        let pause = l.state().pause;
        let r = l.enter();
        drop(l);
        bug_on_misuse(r)?;
        Ok(LazySection { left: false, pause })
    }

    /// Leave the section, reporting its refusals. A pause taken inside the section and not
    /// resumed is `LeaveWhilePaused` (the leave would be ignored and the section stay open);
    /// the section is then still open, for the caller to resume and leave.
    pub fn leave(mut self) -> Result<(), MmuError> {
        self.left = true;
        let now = this_cpu().state().pause;
        if now > self.pause {
            return Err(MmuError::LeaveWhilePaused {
                pause: u32::from(now - self.pause),
            });
        }
        leave()
    }
}

impl Drop for LazySection {
    fn drop(&mut self) {
        if !self.left {
            let r = this_cpu().leave_deferring();
            let _ = bug_on_misuse(r);
        }
    }
}

/// Write `pte` to the leaf entry at `ptep`, which maps `va`: queued in lazy mode, one
/// `mmu_update` otherwise (a refusal is then this call's error).
///
/// # Safety
/// The entry must be the caller's to change: no Rust reference may rely on what `va` maps now,
/// and `pte` must map a frame the caller may hand out at `va` (or nothing).
pub unsafe fn set_pte(ptep: MachAddr, pte: Pte, va: VirtAddr) -> Result<(), MmuError> {
    this_cpu().set_pte(ptep, pte, va)
}

/// Write `pte` to the upper-level (L2..L4) entry at `ptr`: hook or unhook a page table.
///
/// # Safety
/// As for [`set_pte`], for the whole range the entry covers; a hooked table must be one the
/// caller owns.
pub unsafe fn set_table_entry(ptr: MachAddr, pte: Pte) -> Result<(), MmuError> {
    this_cpu().set_table_entry(ptr, pte)
}

/// Linux's generic `set_ptes()`: `nr` consecutive entries from `ptep` (mapping `addr`
/// onwards), the frame advancing by one pseudo-physical page each step, inside a lazy section
/// of its own. Before anything is queued: the contract (`nr`, alignment, one L1 table), then the
/// frames (all the domain's). Overflow-proof for any `nr`.
///
/// # Safety
/// As for [`set_pte`], for every entry and frame.
pub unsafe fn set_ptes(addr: VirtAddr, ptep: MachAddr, pte: Pte, nr: u64) -> Result<(), MmuError> {
    check_set_ptes(addr, ptep, nr).map_err(MmuError::SetPtes)?;
    let first = check_frames(pte, nr).map_err(MmuError::SetPtes)?;
    let next = |i: u64| match first {
        // Checked above: first + i < nr_pages for every i < nr.
        Some(pfn) => pte
            .with_mfn(p2m::pfn_to_mfn(Pfn::new(pfn.get() + i)).expect("set_ptes: frames checked")),
        None => pte,
    };
    let r = this_cpu().set_ptes(addr, ptep, nr, next);
    bug_on_misuse(r)
}

/// `set_ptes`'s frame check: the first frame of a present `pte` if `nr` frames from it are
/// all the domain's; `None`
/// for a non-present value (which `set_ptes` repeats as it is).
pub fn check_frames(pte: Pte, nr: u64) -> Result<Option<Pfn>, SetPtesRule> {
    if !pte.is_present() {
        return Ok(None);
    }
    let Some(first) = p2m::owned_pfn(pte.mfn()) else {
        return Err(SetPtesRule::ForeignFrame { raw: pte.raw() });
    };
    let nr_pages = boot_info().nr_pages;
    // An owned frame is below nr_pages: the subtraction cannot wrap.
    let beyond = Err(SetPtesRule::FramesBeyondDomain {
        first_pfn: first,
        nr,
        nr_pages,
    });
    if nr > nr_pages - first.get() {
        return beyond;
    }
    // Every frame must be the domain's: a P2M entry may be a hole (a ballooned frame). At most
    // one table's worth is checked (`set_ptes` refuses more before it gets here).
    for i in 1..nr.min(512) {
        if p2m::pfn_to_mfn(Pfn::new(first.get() + i)).is_none() {
            return beyond;
        }
    }
    Ok(Some(first))
}

/// Change the mapping of `va` in the current tables and invalidate it.
///
/// # Safety
/// As for [`set_pte`].
pub unsafe fn update_va_mapping(va: VirtAddr, pte: Pte) -> Result<(), MmuError> {
    this_cpu().update_va_mapping(va, pte, UVMF_INVLPG)
}

/// Queue (or issue) a table operation. Each kind is sound whatever the caller does: a TLB
/// operation changes no mapping; a pin makes Xen validate the frame as a table (it refuses a
/// frame mapped writable anywhere) and hold that type; an unpin drops the hold, and Xen keeps
/// the type while the table is hooked anywhere.
pub(super) fn table_op(op: TableOp) -> Result<(), MmuError> {
    this_cpu().table_op(op)
}

/// Invalidate this vCPU's TLB entry for `va` (rides in the batch in lazy mode).
pub fn flush_tlb_one(va: VirtAddr) -> Result<(), MmuError> {
    table_op(TableOp::InvlpgLocal(va))
}

/// Flush this vCPU's whole TLB (rides in the batch in lazy mode).
pub fn flush_tlb_local() -> Result<(), MmuError> {
    table_op(TableOp::TlbFlushLocal)
}

/// Read an entry, flushing first if a queued write may change it (refusals of that flush are
/// kept for the call that ends the batching). Any frame of the domain can be read (page tables
/// or not); a machine address outside the domain's frames is an error.
pub fn ptep_get(ptep: MachAddr) -> Result<Pte, MmError> {
    this_cpu().read_pte(ptep).map_err(|e| match e {
        MmuError::NotOwned { ptr } => MmError::ForeignFrame { maddr: ptr },
        other => MmError::Mmu(other),
    })
}

/// The live value of an entry, without flushing anything queued.
pub fn live_pte(ptep: MachAddr) -> Result<Pte, MmError> {
    use lazy_mmu::Hypervisor;
    this_cpu()
        .hypervisor()
        .read_pte(ptep)
        .map_err(|e| MmError::ForeignFrame { maddr: e.ptr })
}

/// Choose the rules for switches and interrupts (`lazy=was-lazy-flag`, `irq=batch` restore
/// the historical ones).
pub fn set_rules(rules: Rules) {
    this_cpu().set_rules(rules);
}

pub fn rules() -> Rules {
    this_cpu().rules()
}

/// Switch the running task out (Linux: `xen_start_context_switch`): flush its batch, keep its
/// refusals with its state. Only the scheduler calls this, with events masked.
pub fn switch_out() -> Result<TaskLazy, MmuError> {
    this_cpu().switch_out()
}

/// Switch a task in (Linux: `xen_end_context_switch`): batching resumes at its depth.
pub fn switch_in(task: TaskLazy) -> Result<(), MmuError> {
    this_cpu().switch_in(task)
}

/// An interrupt handler starts: lazy mode is off until [`irq_exit`].
pub fn irq_enter() {
    this_cpu().irq_enter();
}

/// The handler ends.
pub fn irq_exit() -> Result<(), MmuError> {
    this_cpu().irq_exit()
}

pub fn in_interrupt() -> bool {
    this_cpu().in_interrupt()
}

/// The running task's section state (enable and pause counts), also inside a handler (the
/// interrupted task's).
pub fn lazy_state() -> LazyState {
    this_cpu().state()
}
