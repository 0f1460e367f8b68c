//! The program generator.

use alloc::vec::Vec;

use hypercalls::addr::ENTRIES_PER_TABLE;

use super::Rng;

const TABLE: usize = ENTRIES_PER_TABLE as usize;

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
    // Every program batches, whatever else the rolls do: one section early on whose writes
    // fill the smallest batch (4 entries, 16 requests), with a refused write among them.
    if ops >= MIN_OPS && max_depth > 0 && slots > 0 && frames > 0 {
        burst(&mut rng, &mut program, slots, frames, opts);
    }
    let pick_slot = |rng: &mut Rng, recent: &[usize]| {
        if !recent.is_empty() && rng.chance(1, 2) {
            recent[rng.below(recent.len())]
        } else {
            rng.below(slots)
        }
    };
    while program.len() + open.len() < ops {
        // Opening needs room for its closing op too.
        // A pause suspends batching for everything inside it: inside one, open little more (a
        // section entered while paused does nothing), and close it soon, so that programs of
        // every depth batch most of the time.
        let paused = open.contains(&Open::Pause);
        let can_open = (open.len() as u32) < max_depth
            && program.len() + open.len() + 2 <= ops
            && (!paused || rng.chance(1, 8));
        if open.last() == Some(&Open::Pause) && rng.chance(1, 3) {
            open.pop();
            program.push(Op::Resume);
            continue;
        }
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

/// Programs shorter than this cannot hold the guaranteed batching section.
pub const MIN_OPS: usize = BURST_WRITES + BURST_WRITES / 2 + 2;
const BURST_WRITES: usize = 18;

/// Why a program cannot be generated as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenError {
    /// Too short to batch anything meaningfully.
    TooFewOps { ops: usize },
    /// Depth 0 allows no lazy section: nothing would batch.
    NoSections,
}

impl core::fmt::Display for GenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GenError::TooFewOps { ops } => write!(
                f,
                "ops={ops} is too short: a program needs at least {MIN_OPS} operations to hold a section that fills the smallest batch and a refused write"
            ),
            GenError::NoSections => {
                write!(f, "depth=0 allows no lazy section: nothing would batch")
            }
        }
    }
}

/// Can [`generate_with`] make a meaningful program of this size and depth?
pub fn check(ops: usize, max_depth: u32) -> Result<(), GenError> {
    if max_depth == 0 {
        return Err(GenError::NoSections);
    }
    if ops < MIN_OPS {
        return Err(GenError::TooFewOps { ops });
    }
    Ok(())
}

/// One section of `BURST_WRITES` writes (one refused, if refusals are on) with invalidations
/// between some of them (if TLB ops are on): it fills 16 requests or 4 entries.
fn burst(rng: &mut Rng, program: &mut Vec<Op>, slots: usize, frames: usize, opts: GenOptions) {
    program.push(Op::Enter);
    let bad_at = rng.below(BURST_WRITES);
    for i in 0..BURST_WRITES {
        let slot = rng.below(slots);
        program.push(if opts.refusals && i == bad_at {
            Op::Bad { slot }
        } else {
            Op::SetPte {
                slot,
                frame: rng.below(frames),
            }
        });
        if opts.tlb_ops && i % 2 == 1 {
            program.push(Op::Invlpg { slot });
        }
    }
    program.push(Op::Leave);
}

fn remember(recent: &mut Vec<usize>, slot: usize) {
    if recent.len() == 16 {
        recent.remove(0);
    }
    recent.push(slot);
}
