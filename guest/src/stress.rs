//! Seeded random programs of lazy-MMU operations, shared by host property tests and the in-guest
//! stress test.
//!
//! [`generate`] makes a balanced program (every lazy section and pause closed, properly nested);
//! [`generate_with`] can add writes Xen must refuse and queued TLB flushes. [`run`] executes a
//! program through the [`LazyMmu`] API while keeping a [`Shadow`]: the value every slot would
//! hold if each write took effect the moment it was made (a refused write changes nothing).
//! Callers compare the live page tables with the shadow after every leave, when the batching
//! promises they agree. [`run`] also checks that every refusal is reported exactly once, by the
//! call that ends the batching.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use hypercalls::XenError;
use hypercalls::abi::{MMUEXT_INVLPG_LOCAL, MMUEXT_TLB_FLUSH_LOCAL, mmuext_plain, mmuext_va};

use crate::mm::lazy::{
    ENTRIES_PER_TABLE, FlushReason, Hypervisor, LazyMmu, MAX_REPORTED, MmuError, Rejected,
};

const TABLE: usize = ENTRIES_PER_TABLE as usize;

/// xorshift64*: small, fast, deterministic for a seed on every target.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed: nearby seeds give unrelated streams, and the state is never 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng {
            state: if z == 0 { 0x2545_F491_4F6C_DD1D } else { z },
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-enough in `0..n` (multiply-shift; the bias is below 2^-32 for the sizes used).
    /// `n` must be at least 1.
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// True `num` times in `den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
}

/// One step of a stress program. Slots and frames are indices into the caller's [`Layout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Enter,
    Leave,
    /// Map data frame `frame` at `slot`.
    SetPte {
        slot: usize,
        frame: usize,
    },
    /// Clear `slot`.
    Clear {
        slot: usize,
    },
    /// `set_ptes()` of `nr` slots from `slot`, mapping frames `frame..frame + nr`.
    SetPtes {
        slot: usize,
        nr: usize,
        frame: usize,
    },
    Flush,
    Pause,
    Resume,
    /// Read `slot` through the lazy-MMU API and check it against the shadow.
    Read {
        slot: usize,
    },
    /// Write [`Layout::bad_value`] to `slot`: Xen refuses it, the slot keeps its value.
    Bad {
        slot: usize,
    },
    /// `MMUEXT_TLB_FLUSH_LOCAL` through [`LazyMmu::mmuext`].
    FlushTlb,
    /// `MMUEXT_INVLPG_LOCAL` of the slot's address through [`LazyMmu::mmuext`].
    Invlpg {
        slot: usize,
    },
}

/// What [`generate_with`] may put into a program besides [`generate`]'s ops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenOptions {
    /// [`Op::Bad`]: writes Xen refuses.
    pub refusals: bool,
    /// [`Op::FlushTlb`] and [`Op::Invlpg`]: queued entries that are not `mmu_update`s.
    pub tlb_ops: bool,
}

impl GenOptions {
    /// Every extra op.
    pub const ALL: GenOptions = GenOptions {
        refusals: true,
        tlb_ops: true,
    };
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Section,
    Pause,
}

/// A random balanced program of about `ops` operations: lazy sections nest up to `max_depth`
/// (pauses count towards the nesting too and can nest themselves), every section and pause is
/// closed in LIFO order by the end, `SetPtes` ranges stay inside one 512-slot table and below
/// `slots`/`frames`. The program has exactly `ops` operations. No refused writes and no TLB ops:
/// [`generate_with`] with the default options.
pub fn generate(seed: u64, ops: usize, max_depth: u32, slots: usize, frames: usize) -> Vec<Op> {
    generate_with(seed, ops, max_depth, slots, frames, GenOptions::default())
}

/// [`generate`], with the extra ops `opts` asks for. With none, a seed gives the same program as
/// [`generate`] always did (the extra ops take rolls that otherwise become `SetPte`s).
pub fn generate_with(
    seed: u64,
    ops: usize,
    max_depth: u32,
    slots: usize,
    frames: usize,
    opts: GenOptions,
) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let mut program = Vec::with_capacity(ops);
    let mut open: Vec<Open> = Vec::new();
    // Recently written slots: reads and rewrites of them exercise read hazards and overwrites
    // of queued requests.
    let mut recent: Vec<usize> = Vec::new();
    let pick_slot = |rng: &mut Rng, recent: &[usize]| {
        if !recent.is_empty() && rng.chance(1, 2) {
            recent[rng.below(recent.len())]
        } else {
            rng.below(slots)
        }
    };
    while program.len() + open.len() < ops {
        // Opening needs room for its closing op too.
        let can_open = (open.len() as u32) < max_depth && program.len() + open.len() + 2 <= ops;
        let roll = rng.below(100);
        let op = match roll {
            // Opening a little more often than closing drifts towards deep nesting.
            0..=10 if can_open => {
                open.push(Open::Section);
                Op::Enter
            }
            11..=13 if can_open => {
                open.push(Open::Pause);
                Op::Pause
            }
            14..=24 if !open.is_empty() => match open.pop() {
                Some(Open::Section) => Op::Leave,
                _ => Op::Resume,
            },
            25..=27 => Op::Flush,
            28..=39 if slots > 0 => Op::Read {
                slot: pick_slot(&mut rng, &recent),
            },
            40..=47 if slots > 0 => Op::Clear {
                slot: pick_slot(&mut rng, &recent),
            },
            48..=59 if slots > 0 && frames > 0 => {
                let slot = rng.below(slots);
                let room = (TABLE - slot % TABLE).min(slots - slot).min(frames);
                let limit = match rng.below(20) {
                    0..=9 => 8,
                    10..=16 => 64,
                    _ => TABLE,
                };
                let nr = 1 + rng.below(room.min(limit));
                let frame = rng.below(frames - nr + 1);
                for s in slot..slot + nr.min(4) {
                    remember(&mut recent, s);
                }
                Op::SetPtes { slot, nr, frame }
            }
            // Recent slots, so that refusals land between queued writes to the same entry; now
            // and then a burst, so that one report holds more refusals than it lists.
            60..=62 if opts.refusals && slots > 0 => {
                let burst = if rng.chance(1, 8) {
                    4 + rng.below(12)
                } else {
                    1
                };
                let room = ops - program.len() - open.len();
                for _ in 1..burst.min(room) {
                    let slot = pick_slot(&mut rng, &recent);
                    remember(&mut recent, slot);
                    program.push(Op::Bad { slot });
                }
                let slot = pick_slot(&mut rng, &recent);
                remember(&mut recent, slot);
                Op::Bad { slot }
            }
            63..=65 if opts.tlb_ops => Op::FlushTlb,
            66..=69 if opts.tlb_ops && slots > 0 => Op::Invlpg {
                slot: pick_slot(&mut rng, &recent),
            },
            _ if slots > 0 && frames > 0 => {
                let slot = pick_slot(&mut rng, &recent);
                remember(&mut recent, slot);
                Op::SetPte {
                    slot,
                    frame: rng.below(frames),
                }
            }
            _ => Op::Flush,
        };
        program.push(op);
        // Linux invalidates a page after changing its entry: write, invlpg, write, invlpg, ...
        // alternates entry kinds, which is what fills the entry buffer.
        if let Op::SetPte { slot, .. } | Op::Clear { slot } | Op::Bad { slot } = op
            && opts.tlb_ops
            && program.len() + open.len() < ops
            && rng.chance(1, 4)
        {
            program.push(Op::Invlpg { slot });
        }
    }
    while let Some(o) = open.pop() {
        program.push(match o {
            Open::Section => Op::Leave,
            Open::Pause => Op::Resume,
        });
    }
    program
}

fn remember(recent: &mut Vec<usize>, slot: usize) {
    if recent.len() == 16 {
        recent.remove(0);
    }
    recent.push(slot);
}

/// Where the slots of a stress program live.
///
/// Slot `s` is entry `s % 512` of the `s / 512`-th L1 table, so `va(s)` must be page aligned and
/// map entry `s % 512` of its table (as `set_ptes()` checks).
pub trait Layout {
    /// Machine address of the slot's L1 entry.
    fn pte_ptr(&self, slot: usize) -> u64;
    /// The virtual address the slot maps.
    fn va(&self, slot: usize) -> u64;
    /// The entry mapping data frame `frame` (never 0; 0 clears a slot). It must be the value as
    /// Xen stores it (a 64-bit PV guest's L1 entries get `_PAGE_USER` and, for kernel mappings,
    /// `_PAGE_GUEST_KERNEL` added), so that reading it back compares equal.
    fn pte_value(&self, frame: usize) -> u64;
    /// An entry Xen refuses in every slot for the whole program, e.g. a writable mapping of one
    /// of the page-table frames (`get_page_from_l1e`: -EBUSY). Used by [`Op::Bad`].
    fn bad_value(&self) -> u64;
}

/// The eager reference: what every slot must hold once the queue is flushed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shadow {
    values: Vec<u64>,
}

impl Shadow {
    pub fn new(values: Vec<u64>) -> Self {
        Shadow { values }
    }

    /// Slots covered (those a program touches, from 0).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn get(&self, slot: usize) -> u64 {
        self.values[slot]
    }

    fn set(&mut self, slot: usize, val: u64) {
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
    pub flushes_by_reason: [u64; 6],
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
    let slots = program.iter().map(op_end).max().unwrap_or(0);
    let mut values = Vec::with_capacity(slots);
    for slot in 0..slots {
        let val = lazy.read_pte(layout.pte_ptr(slot));
        values.push(val);
    }
    let mut shadow = Shadow::new(values);
    let mut stats = RunStats::default();
    let start = lazy.counters();
    // Slots of the queued requests, oldest first (what the queue holds is always the newest
    // `queued_requests()` writes; requests queued before the run are unknown).
    let mut queued: Vec<usize> = vec![usize::MAX; lazy.queued_requests()];
    let mut refusals = Refusals::default();

    for (index, op) in program.iter().enumerate() {
        let fail = |e: &dyn core::fmt::Display| format!("op {index} ({op:?}): {e}");
        observer.before_op(index, op, lazy, &shadow);
        let active = lazy.is_active();
        let before = lazy.counters().hypercalls;
        // Does this call end the batching, i.e. must it report every refusal not yet reported?
        let (result, ends_batching) = match *op {
            Op::Enter => {
                stats.enters += 1;
                (lazy.enter(), false)
            }
            Op::Leave => {
                if active && lazy.depth() > 1 {
                    stats.nested_leaves += 1;
                }
                stats.leaves += 1;
                let outermost = active && lazy.depth() == 1;
                (lazy.leave(), outermost)
            }
            Op::SetPte { slot, frame } => {
                count_write(&mut stats, &mut queued, active, slot, 1);
                let val = layout.pte_value(frame);
                shadow.set(slot, val);
                (
                    lazy.set_pte(layout.pte_ptr(slot), val, layout.va(slot)),
                    !active,
                )
            }
            Op::Clear { slot } => {
                count_write(&mut stats, &mut queued, active, slot, 1);
                shadow.set(slot, 0);
                (
                    lazy.set_pte(layout.pte_ptr(slot), 0, layout.va(slot)),
                    !active,
                )
            }
            Op::Bad { slot } => {
                count_write(&mut stats, &mut queued, active, slot, 1);
                stats.refused_writes += 1;
                let (ptr, val, va) = (layout.pte_ptr(slot), layout.bad_value(), layout.va(slot));
                refusals.unreported.push((va, ptr, val));
                (lazy.set_pte(ptr, val, va), !active)
            }
            Op::SetPtes { slot, nr, frame } => {
                for i in 0..nr {
                    shadow.set(slot + i, layout.pte_value(frame + i));
                }
                let batched = !lazy.is_paused();
                count_write(&mut stats, &mut queued, batched, slot, nr);
                let result = lazy.set_ptes(layout.va(slot), layout.pte_ptr(slot), nr as u64, |i| {
                    layout.pte_value(frame + i as usize)
                });
                // Outside lazy mode (and not paused) its own leave is the outermost one.
                (result, !active && batched)
            }
            Op::Flush => {
                stats.flushes += 1;
                (lazy.flush(), true)
            }
            Op::Pause => {
                stats.pauses += 1;
                (lazy.pause(), active)
            }
            Op::Resume => (lazy.resume(), false),
            Op::Read { slot } => {
                stats.reads += 1;
                if active && queued.contains(&slot) {
                    stats.hazard_reads += 1;
                }
                let found = lazy.read_pte(layout.pte_ptr(slot));
                let expected = shadow.get(slot);
                if found != expected {
                    return Err(fail(&format_args!(
                        "read {found:#x}, the shadow holds {expected:#x} (pte maddr {:#x})",
                        layout.pte_ptr(slot)
                    )));
                }
                (Ok(()), false)
            }
            Op::FlushTlb | Op::Invlpg { .. } => {
                stats.tlb_ops += 1;
                if active {
                    stats.batched_tlb_ops += 1;
                }
                let tlb = match *op {
                    Op::Invlpg { slot } => mmuext_va(MMUEXT_INVLPG_LOCAL, layout.va(slot)),
                    _ => mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL),
                };
                (lazy.mmuext(tlb), !active)
            }
        };
        let reported = refusals
            .settle(lazy, result, ends_batching)
            .map_err(|e| fail(&e))?;
        stats.reported_refusals += reported;
        *match op {
            Op::Leave | Op::SetPtes { .. } => &mut stats.reported_by_leave,
            Op::Flush => &mut stats.reported_by_flush,
            Op::Pause => &mut stats.reported_by_pause,
            _ => &mut stats.reported_at_once,
        } += reported;
        stats.most_reported_by_one_call = stats.most_reported_by_one_call.max(reported);
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
            stats.lazy_hypercalls += made;
        }
        let q = lazy.queued_requests();
        if queued.len() > q {
            queued.drain(..queued.len() - q);
        }
        stats.ops += 1;
        stats.max_depth = stats.max_depth.max(lazy.depth());
        if matches!(op, Op::Leave | Op::SetPtes { .. }) {
            observer
                .after_leave(lazy, &shadow)
                .map_err(|e| fail(&format_args!("after leave: {e}")))?;
        }
        observer
            .after_op(index, op, lazy, &shadow)
            .map_err(|e| fail(&e))?;
    }
    if !refusals.unreported.is_empty() {
        return Err(format!(
            "{} refused write(s), {} reported: {} never reported",
            stats.refused_writes,
            stats.reported_refusals,
            refusals.unreported.len()
        ));
    }

    stats.refusal_error = refusals.error;

    let end = lazy.counters();
    stats.hypercalls = end.hypercalls - start.hypercalls;
    for (i, n) in stats.flushes_by_reason.iter_mut().enumerate() {
        *n = end.flushes[i] - start.flushes[i];
    }
    Ok(stats)
}

/// The refused writes made and not yet reported, and the check of each call's result against
/// the reporting rule.
#[derive(Default)]
struct Refusals {
    /// `(va, pte maddr, value)` of each.
    unreported: Vec<(u64, u64, u64)>,
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
        let (count, listed): (u64, Vec<Rejected>) = match result {
            // The refusals so far stay for the call that ends the batching.
            Ok(()) if !ends_batching => return Ok(0),
            Ok(()) => (0, Vec::new()),
            Err(MmuError::Flush(f)) if ends_batching => {
                let listed: Vec<Rejected> = lazy.last_rejections().copied().collect();
                if listed.first() != Some(&f.first) {
                    return Err(format!(
                        "the error's first refusal is not the first listed ({} listed): {f}",
                        listed.len()
                    ));
                }
                (f.count as u64, listed)
            }
            Err(MmuError::Immediate(r)) if ends_batching => (1, vec![r]),
            Err(e @ (MmuError::Flush(_) | MmuError::Immediate(_))) => {
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
            let Some(i) = self
                .unreported
                .iter()
                .position(|&w| w == (r.va, r.ptr, r.val))
            else {
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
        let found = lazy.hypervisor().read_pte(ptr);
        let expected = shadow.get(slot);
        if found != expected {
            return Err(format!(
                "slot {slot} (pte maddr {ptr:#x}): expected {expected:#x}, found {found:#x}"
            ));
        }
    }
    Ok(())
}
