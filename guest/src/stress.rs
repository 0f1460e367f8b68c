//! Seeded random programs of lazy-MMU operations, shared by host property tests and the in-guest
//! stress test.
//!
//! [`generate`] makes a balanced program (every lazy section and pause closed, properly nested);
//! [`run`] executes it through the [`LazyMmu`] API while keeping a [`Shadow`]: the value every
//! slot would hold if each write took effect the moment it was made. Callers compare the live
//! page tables with the shadow after every leave, when the batching promises they agree.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::mm::lazy::{ENTRIES_PER_TABLE, FlushReason, Hypervisor, LazyMmu};

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
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Section,
    Pause,
}

/// A random balanced program of about `ops` operations: lazy sections nest up to `max_depth`
/// (pauses count towards the nesting too and can nest themselves), every section and pause is
/// closed in LIFO order by the end, `SetPtes` ranges stay inside one 512-slot table and below
/// `slots`/`frames`. The program has exactly `ops` operations.
pub fn generate(seed: u64, ops: usize, max_depth: u32, slots: usize, frames: usize) -> Vec<Op> {
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
    /// Of those, the ones made by single writes, clears and reads inside active lazy sections:
    /// only full buffers and read hazards may cause them.
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
/// Errors: a lazy-MMU call failed, a read disagreed with the shadow, or `after_leave` failed.
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

    for (index, op) in program.iter().enumerate() {
        let fail = |e: &dyn core::fmt::Display| format!("op {index} ({op:?}): {e}");
        observer.before_op(index, op, lazy, &shadow);
        let active = lazy.is_active();
        let before = lazy.counters().hypercalls;
        match *op {
            Op::Enter => {
                lazy.enter().map_err(|e| fail(&e))?;
                stats.enters += 1;
            }
            Op::Leave => {
                if active && lazy.depth() > 1 {
                    stats.nested_leaves += 1;
                }
                lazy.leave().map_err(|e| fail(&e))?;
                stats.leaves += 1;
            }
            Op::SetPte { slot, frame } => {
                write(lazy, layout, &mut shadow, slot, layout.pte_value(frame))
                    .map_err(|e| fail(&e))?;
                count_write(&mut stats, &mut queued, active, slot, 1);
            }
            Op::Clear { slot } => {
                write(lazy, layout, &mut shadow, slot, 0).map_err(|e| fail(&e))?;
                count_write(&mut stats, &mut queued, active, slot, 1);
            }
            Op::SetPtes { slot, nr, frame } => {
                for i in 0..nr {
                    shadow.set(slot + i, layout.pte_value(frame + i));
                }
                let batched = !lazy.is_paused();
                lazy.set_ptes(layout.va(slot), layout.pte_ptr(slot), nr as u64, |i| {
                    layout.pte_value(frame + i as usize)
                })
                .map_err(|e| fail(&e))?;
                count_write(&mut stats, &mut queued, batched, slot, nr);
            }
            Op::Flush => {
                lazy.flush().map_err(|e| fail(&e))?;
                stats.flushes += 1;
            }
            Op::Pause => {
                lazy.pause().map_err(|e| fail(&e))?;
                stats.pauses += 1;
            }
            Op::Resume => lazy.resume().map_err(|e| fail(&e))?,
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
            }
        }
        let made = lazy.counters().hypercalls - before;
        if active && matches!(op, Op::SetPte { .. } | Op::Clear { .. } | Op::Read { .. }) {
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

    let end = lazy.counters();
    stats.hypercalls = end.hypercalls - start.hypercalls;
    for (i, n) in stats.flushes_by_reason.iter_mut().enumerate() {
        *n = end.flushes[i] - start.flushes[i];
    }
    Ok(stats)
}

/// One past the highest slot `op` touches.
fn op_end(op: &Op) -> usize {
    match *op {
        Op::SetPte { slot, .. } | Op::Clear { slot } | Op::Read { slot } => slot + 1,
        Op::SetPtes { slot, nr, .. } => slot + nr,
        _ => 0,
    }
}

fn write<H: Hypervisor, const E: usize, const R: usize>(
    lazy: &mut LazyMmu<H, E, R>,
    layout: &impl Layout,
    shadow: &mut Shadow,
    slot: usize,
    val: u64,
) -> Result<(), crate::mm::lazy::MmuError> {
    shadow.set(slot, val);
    lazy.set_pte(layout.pte_ptr(slot), val, layout.va(slot))
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
