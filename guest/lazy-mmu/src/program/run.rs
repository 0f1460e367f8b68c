//! Running a program against the lazy-MMU API, with a shadow of what the tables must hold.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use hypercalls::{Pte, XenError};

use super::{Layout, Op};
use crate::counters::FlushReason;
use crate::hypervisor::Hypervisor;
use crate::report::{MAX_REPORTED, MmuError, Refusal};
use crate::request::{Request, TableOp};
use crate::state::LazyMmu;

/// The eager reference: what every slot must hold once the queue is flushed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shadow {
    values: Vec<Pte>,
}

impl Shadow {
    pub fn new(values: Vec<Pte>) -> Self {
        Shadow { values }
    }

    /// Slots covered (those a program touches, from 0).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn get(&self, slot: usize) -> Pte {
        self.values[slot]
    }

    fn set(&mut self, slot: usize, val: Pte) {
        self.values[slot] = val;
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub ops: usize,
    /// Page-table writes (a `SetPtes` counts `nr`).
    pub writes: usize,
    /// Of those, the ones batched: made in an active lazy section, or by a `set_ptes()` that was
    /// not paused (it opens its own section).
    pub batched_writes: usize,
    /// Of those, the ones issued at once.
    pub immediate_writes: usize,
    /// Of all writes, the [`Op::Bad`] ones Xen must refuse.
    pub refused_writes: usize,
    /// Refusals the lazy-MMU calls reported (the sum of the errors' counts); equals
    /// `refused_writes` at the end of a successful run.
    pub reported_refusals: u64,
    /// Of those, the ones reported by outermost leaves, by `flush()`, by pauses, and by the
    /// refused write itself (outside lazy mode).
    pub reported_by_leave: u64,
    pub reported_by_flush: u64,
    pub reported_by_pause: u64,
    pub reported_at_once: u64,
    /// Most refusals one call reported (beyond [`MAX_REPORTED`] only the count tells).
    pub most_reported_by_one_call: u64,
    /// Xen's error for the refused writes (one value, one reason: the runner fails if a listed
    /// refusal gives another).
    pub refusal_error: Option<XenError>,
    /// TLB flushes and invalidations, and of those the ones queued in an active section.
    pub tlb_ops: usize,
    pub batched_tlb_ops: usize,
    pub reads: usize,
    /// Reads of a slot with a queued write (which must flush first).
    pub hazard_reads: usize,
    pub enters: usize,
    /// Every leave op, and of those the nested ones (depth > 1 and not paused).
    pub leaves: usize,
    pub nested_leaves: usize,
    pub pauses: usize,
    pub flushes: usize,
    /// Deepest lazy nesting seen between ops.
    pub max_depth: u32,
    /// Hypercalls the lazy-MMU layer made during the run.
    pub hypercalls: u64,
    /// Of those, the ones made by single writes, clears, reads and TLB ops inside active lazy
    /// sections: only full buffers and read hazards (and the reissues after a refusal in
    /// their flushes) may cause them.
    pub lazy_hypercalls: u64,
    /// Non-empty flushes during the run, indexed like [`FlushReason::ALL`].
    pub flushes_by_reason: [u64; crate::counters::N_REASONS],
}

impl RunStats {
    pub fn flushes_for(&self, reason: FlushReason) -> u64 {
        self.flushes_by_reason[reason as usize]
    }
}

/// Hooks into [`run_with`].
pub trait Observer<H: Hypervisor, const E: usize, const R: usize> {
    /// Before op `index` runs.
    fn before_op(&mut self, _index: usize, _op: &Op, _lazy: &LazyMmu<H, E, R>, _shadow: &Shadow) {}

    /// After op `index` ran.
    fn after_op(
        &mut self,
        _index: usize,
        _op: &Op,
        _lazy: &mut LazyMmu<H, E, R>,
        _shadow: &Shadow,
    ) -> Result<(), String> {
        Ok(())
    }

    /// After every leave (nested or outermost) and every `SetPtes` (which ends with one): the
    /// live tables must equal the shadow here.
    fn after_leave(
        &mut self,
        _lazy: &mut LazyMmu<H, E, R>,
        _shadow: &Shadow,
    ) -> Result<(), String> {
        Ok(())
    }
}

struct AfterLeave<F>(F);

impl<H, const E: usize, const R: usize, F> Observer<H, E, R> for AfterLeave<F>
where
    H: Hypervisor,
    F: FnMut(&mut LazyMmu<H, E, R>, &Shadow) -> Result<(), String>,
{
    fn after_leave(&mut self, lazy: &mut LazyMmu<H, E, R>, shadow: &Shadow) -> Result<(), String> {
        (self.0)(lazy, shadow)
    }
}

/// Run `program` through `lazy`, calling `after_leave` after every leave (and every `SetPtes`).
/// Errors: a lazy-MMU call failed (other than by reporting refusals where the rule allows), a
/// read disagreed with the shadow, a refusal was reported wrongly, or `after_leave` failed.
///
/// The reporting rule: every refused write is reported exactly once, by the call that ends the
/// batching it was made in: the outermost leave, an explicit `flush()`, a `pause()` that
/// flushes, or outside lazy mode the write itself. A write, read, nested leave or `set_ptes()`
/// inside a section reports nothing. `lazy` must have no unreported refusals when the run starts.
pub fn run<H: Hypervisor, const E: usize, const R: usize>(
    lazy: &mut LazyMmu<H, E, R>,
    layout: &impl Layout,
    program: &[Op],
    after_leave: impl FnMut(&mut LazyMmu<H, E, R>, &Shadow) -> Result<(), String>,
) -> Result<RunStats, String> {
    run_with(lazy, layout, program, &mut AfterLeave(after_leave))
}

/// [`run`] with per-op hooks.
pub fn run_with<H: Hypervisor, const E: usize, const R: usize>(
    lazy: &mut LazyMmu<H, E, R>,
    layout: &impl Layout,
    program: &[Op],
    observer: &mut impl Observer<H, E, R>,
) -> Result<RunStats, String> {
    let mut stepper = Stepper::new(lazy, layout, program)?;
    for op in program {
        stepper.step(lazy, layout, op, observer)?;
    }
    stepper.finish(lazy)
}

/// A program run one op at a time ([`run_with`] is `new`, `step` for each op, `finish`), so
/// that the caller can let go of the batch between ops: a task of a preemptible kernel runs
/// each op with the per-vCPU batch locked and may be switched out between them. A switch
/// flushes the queue (the task's refusals stay with its state), which the stepper allows for:
/// the checks are the same as [`run_with`]'s.
pub struct Stepper {
    shadow: Shadow,
    stats: RunStats,
    start: crate::counters::Counters,
    /// Slots of the queued requests, oldest first (what the queue holds is always the newest
    /// `queued_requests()` writes; requests queued before the run are unknown).
    queued: Vec<usize>,
    refusals: Refusals,
    index: usize,
}

impl Stepper {
    /// Read the slots `program` touches into the shadow.
    pub fn new<H: Hypervisor, const E: usize, const R: usize>(
        lazy: &mut LazyMmu<H, E, R>,
        layout: &impl Layout,
        program: &[Op],
    ) -> Result<Stepper, String> {
        let slots = program.iter().map(op_end).max().unwrap_or(0);
        let mut values = Vec::with_capacity(slots);
        for slot in 0..slots {
            let val = lazy
                .read_pte(layout.pte_ptr(slot))
                .map_err(|e| format!("slot {slot}: {e}"))?;
            values.push(val);
        }
        Ok(Stepper {
            shadow: Shadow::new(values),
            stats: RunStats::default(),
            start: lazy.counters(),
            queued: vec![usize::MAX; lazy.queued_requests()],
            refusals: Refusals::default(),
            index: 0,
        })
    }

    /// What every slot must hold once the queue is flushed.
    pub fn shadow(&self) -> &Shadow {
        &self.shadow
    }

    /// Ops run so far.
    pub fn ops_done(&self) -> usize {
        self.index
    }

    /// Run the next op (`op`) and check its result against the shadow and the reporting rule.
    pub fn step<H: Hypervisor, const E: usize, const R: usize>(
        &mut self,
        lazy: &mut LazyMmu<H, E, R>,
        layout: &impl Layout,
        op: &Op,
        observer: &mut impl Observer<H, E, R>,
    ) -> Result<(), String> {
        let index = self.index;
        self.index += 1;
        // A switch since the last op flushed what was queued.
        let q = lazy.queued_requests();
        if self.queued.len() > q {
            self.queued.drain(..self.queued.len() - q);
        }
        let fail = |e: &dyn core::fmt::Display| format!("op {index} ({op:?}): {e}");
        observer.before_op(index, op, lazy, &self.shadow);
        let active = lazy.is_active();
        let before = lazy.counters().hypercalls;
        // Does this call end the batching, i.e. must it report every refusal not yet reported?
        let (result, ends_batching) = match *op {
            Op::Enter => {
                self.stats.enters += 1;
                (lazy.enter(), false)
            }
            Op::Leave => {
                if active && lazy.depth() > 1 {
                    self.stats.nested_leaves += 1;
                }
                self.stats.leaves += 1;
                let outermost = active && lazy.depth() == 1;
                (lazy.leave(), outermost)
            }
            Op::SetPte { slot, frame } => {
                count_write(&mut self.stats, &mut self.queued, active, slot, 1);
                let val = layout.pte_value(frame);
                self.shadow.set(slot, val);
                (
                    lazy.set_pte(layout.pte_ptr(slot), val, layout.va(slot)),
                    !active,
                )
            }
            Op::Clear { slot } => {
                count_write(&mut self.stats, &mut self.queued, active, slot, 1);
                self.shadow.set(slot, Pte::NONE);
                (
                    lazy.set_pte(layout.pte_ptr(slot), Pte::NONE, layout.va(slot)),
                    !active,
                )
            }
            Op::Bad { slot } => {
                count_write(&mut self.stats, &mut self.queued, active, slot, 1);
                self.stats.refused_writes += 1;
                let (ptr, val, va) = (layout.pte_ptr(slot), layout.bad_value(), layout.va(slot));
                self.refusals
                    .unreported
                    .push(Request::SetPte { ptr, val, va });
                (lazy.set_pte(ptr, val, va), !active)
            }
            Op::SetPtes { slot, nr, frame } => {
                for i in 0..nr {
                    self.shadow.set(slot + i, layout.pte_value(frame + i));
                }
                let batched = !lazy.is_paused();
                count_write(&mut self.stats, &mut self.queued, batched, slot, nr);
                let result = lazy.set_ptes(layout.va(slot), layout.pte_ptr(slot), nr as u64, |i| {
                    layout.pte_value(frame + i as usize)
                });
                // Outside lazy mode (and not paused) its own leave is the outermost one.
                (result, !active && batched)
            }
            Op::Flush => {
                self.stats.flushes += 1;
                (lazy.flush(), true)
            }
            Op::Pause => {
                self.stats.pauses += 1;
                (lazy.pause(), active)
            }
            Op::Resume => (lazy.resume(), false),
            Op::Read { slot } => {
                self.stats.reads += 1;
                if active && self.queued.contains(&slot) {
                    self.stats.hazard_reads += 1;
                }
                let found = lazy.read_pte(layout.pte_ptr(slot)).map_err(|e| fail(&e))?;
                let expected = self.shadow.get(slot);
                if found != expected {
                    return Err(fail(&format_args!(
                        "read {found}, the self.shadow holds {expected} (pte maddr {})",
                        layout.pte_ptr(slot)
                    )));
                }
                (Ok(()), false)
            }
            Op::FlushTlb | Op::Invlpg { .. } => {
                self.stats.tlb_ops += 1;
                if active {
                    self.stats.batched_tlb_ops += 1;
                }
                let tlb = match *op {
                    Op::Invlpg { slot } => TableOp::InvlpgLocal(layout.va(slot)),
                    _ => TableOp::TlbFlushLocal,
                };
                (lazy.table_op(tlb), !active)
            }
        };
        let reported = self
            .refusals
            .settle(lazy, result, ends_batching)
            .map_err(|e| fail(&e))?;
        self.stats.reported_refusals += reported;
        *match op {
            Op::Leave | Op::SetPtes { .. } => &mut self.stats.reported_by_leave,
            Op::Flush => &mut self.stats.reported_by_flush,
            Op::Pause => &mut self.stats.reported_by_pause,
            _ => &mut self.stats.reported_at_once,
        } += reported;
        self.stats.most_reported_by_one_call = self.stats.most_reported_by_one_call.max(reported);
        let made = lazy.counters().hypercalls - before;
        let single = matches!(
            op,
            Op::SetPte { .. }
                | Op::Clear { .. }
                | Op::Bad { .. }
                | Op::Read { .. }
                | Op::FlushTlb
                | Op::Invlpg { .. }
        );
        if active && single {
            self.stats.lazy_hypercalls += made;
        }
        let q = lazy.queued_requests();
        if self.queued.len() > q {
            self.queued.drain(..self.queued.len() - q);
        }
        self.stats.ops += 1;
        self.stats.max_depth = self.stats.max_depth.max(lazy.depth());
        if matches!(op, Op::Leave | Op::SetPtes { .. }) {
            observer
                .after_leave(lazy, &self.shadow)
                .map_err(|e| fail(&format_args!("after leave: {e}")))?;
        }
        observer
            .after_op(index, op, lazy, &self.shadow)
            .map_err(|e| fail(&e))?;
        Ok(())
    }

    /// After the last op: every refused write must have been reported.
    pub fn finish<H: Hypervisor, const E: usize, const R: usize>(
        mut self,
        lazy: &LazyMmu<H, E, R>,
    ) -> Result<RunStats, String> {
        if !self.refusals.unreported.is_empty() {
            return Err(format!(
                "{} refused write(s), {} reported: {} never reported",
                self.stats.refused_writes,
                self.stats.reported_refusals,
                self.refusals.unreported.len()
            ));
        }
        self.stats.refusal_error = self.refusals.error;
        let end = lazy.counters();
        self.stats.hypercalls = end.hypercalls - self.start.hypercalls;
        self.stats.flushes_by_reason = end.since(&self.start).flushes;
        Ok(self.stats)
    }
}

/// The refused writes made and not yet reported, and the check of each call's result against
/// the reporting rule.
#[derive(Default)]
struct Refusals {
    /// Each refused request.
    unreported: Vec<Request>,
    /// Xen's error for the first refusal listed.
    error: Option<XenError>,
}

impl Refusals {
    /// Check what a call returned; how many refusals it reported. A call that ends the batching
    /// must report every refused write not yet reported and nothing else; any other call must
    /// succeed.
    fn settle<H: Hypervisor, const E: usize, const R: usize>(
        &mut self,
        lazy: &LazyMmu<H, E, R>,
        result: Result<(), MmuError>,
        ends_batching: bool,
    ) -> Result<u64, String> {
        let (count, listed): (u64, Vec<Refusal>) = match result {
            // The refusals so far stay for the call that ends the batching.
            Ok(()) if !ends_batching => return Ok(0),
            Ok(()) => (0, Vec::new()),
            Err(MmuError::Refused(f)) if ends_batching => {
                let listed: Vec<Refusal> = lazy.last_refusals().copied().collect();
                if listed.first() != Some(&f.first) {
                    return Err(format!(
                        "the error's first refusal is not the first listed ({} listed): {f}",
                        listed.len()
                    ));
                }
                (f.count as u64, listed)
            }
            Err(e @ MmuError::Refused(_)) => {
                return Err(format!(
                    "refusal reported by a call that does not end the batching: {e}"
                ));
            }
            Err(e) => return Err(format!("{e}")),
        };
        if count != self.unreported.len() as u64 {
            return Err(format!(
                "{count} refusal(s) reported, {} refused write(s) not yet reported",
                self.unreported.len()
            ));
        }
        if listed.len() != self.unreported.len().min(MAX_REPORTED) {
            return Err(format!(
                "{} refusal(s) listed for {count} reported",
                listed.len()
            ));
        }
        for r in &listed {
            let Some(i) = self.unreported.iter().position(|w| Some(*w) == r.request) else {
                return Err(format!("reported refusal matches no refused write: {r}"));
            };
            self.unreported.swap_remove(i);
            match self.error {
                Some(e) if e != r.error => {
                    return Err(format!("refused with {e} before, now: {r}"));
                }
                _ => self.error = Some(r.error),
            }
        }
        // The count covers those beyond the listed ones.
        self.unreported.clear();
        Ok(count)
    }
}

/// One past the highest slot `op` touches.
fn op_end(op: &Op) -> usize {
    match *op {
        Op::SetPte { slot, .. }
        | Op::Clear { slot }
        | Op::Read { slot }
        | Op::Bad { slot }
        | Op::Invlpg { slot } => slot + 1,
        Op::SetPtes { slot, nr, .. } => slot + nr,
        _ => 0,
    }
}

fn count_write(
    stats: &mut RunStats,
    queued: &mut Vec<usize>,
    batched: bool,
    slot: usize,
    nr: usize,
) {
    stats.writes += nr;
    if batched {
        stats.batched_writes += nr;
        queued.extend(slot..slot + nr);
    } else {
        stats.immediate_writes += nr;
    }
}

/// Compare the live tables (read straight from the hypervisor, bypassing the queue) with the
/// shadow for slots `0..slots` (those the shadow covers); name the first mismatch.
pub fn compare<H: Hypervisor, const E: usize, const R: usize>(
    lazy: &LazyMmu<H, E, R>,
    layout: &impl Layout,
    shadow: &Shadow,
    slots: usize,
) -> Result<(), String> {
    for slot in 0..slots.min(shadow.len()) {
        let ptr = layout.pte_ptr(slot);
        let found = lazy
            .hypervisor()
            .read_pte(ptr)
            .map_err(|e| format!("slot {slot}: cannot read pte maddr {}", e.ptr))?;
        let expected = shadow.get(slot);
        if found != expected {
            return Err(format!(
                "slot {slot} (pte maddr {ptr}): expected {expected}, found {found}"
            ));
        }
    }
    Ok(())
}
