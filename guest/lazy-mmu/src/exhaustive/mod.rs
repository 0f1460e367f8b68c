//! Exhaustive small-scope checking: every program up to a length over a small alphabet of
//! lazy-MMU calls, each checked against the strict in-order reference.
//!
//! The reference issues every request at once, one hypercall per request, in program order, to
//! its own copy of the [`Model`]. The program under test runs through [`LazyMmu`] on another
//! copy. After every call:
//!
//! * whenever the batch is empty, both copies hold the same tables, types, counts and pins;
//! * a read returns what the reference holds at that point;
//! * every refusal of the reference is reported exactly once, by the call that ends the batching
//!   the request was made in (the outermost leave, a flush, a pause; the request itself when
//!   nothing batches), naming the same request with the same error, in queue order; no other
//!   call reports anything;
//! * no hypercall happens inside a lazy section except as part of a flush.
//!
//! Programs are explored depth first, sharing prefixes (the model's frames are copy-on-write, so
//! a copy of the whole world is cheap). Two kinds of subtree are not explored again, and are
//! counted as checked, because every program in them behaves exactly as one that is explored:
//!
//! * after a call that provably changed nothing (no hypercall, the same lazy state and queue),
//!   every extension equals the shorter program without that call;
//! * after a call that leaves the world *settled* (nothing queued, nothing waiting to be
//!   reported) in a state already explored with at least as many calls to go, the futures are
//!   identical. A settled state is the lazy state plus everything the alphabet can change in
//!   the model: the three entries it writes and every frame's type, count and pin.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use hypercalls::XenError;

use crate::context::TaskLazy;
use crate::hypervisor::Hypervisor;
use crate::model::Model;
use crate::request::Request;
use crate::state::LazyMmu;

mod step;
mod world;

use step::step;
use world::World;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sym {
    Enter,
    Leave,
    Pause,
    Resume,
    Flush,
    /// Read slot 0.
    Read,
    /// Slot 0 ← data frame A (accepted).
    SetA,
    /// Slot 1 ← data frame B (accepted unless the slot's table is gone).
    SetB,
    /// Slot 0 ← a writable mapping of the L1 table itself (always refused: -EBUSY).
    Bad,
    /// `set_ptes` of slots 0 and 1 with writable mappings of consecutive frames F, F+1 (the
    /// first is refused while F is a page table, the second is a data frame).
    SetPtes2,
    /// Invalidate slot 0's address (a TLB op).
    Invlpg,
    /// Hook spare frame F into the L2 as an L1 table.
    Hook,
    /// Pin F as an L1 table.
    Pin,
    /// Unpin F.
    Unpin,
    /// Slot 1 ← a writable mapping of F (refused while F is a page table).
    MapF,
    /// Switch to the other task (two tasks share the vCPU and its batch).
    Switch,
    /// An interrupt whose handler maps slot 2, reads slot 0 (a hazard if the interrupted code
    /// queued a write to it), tries to enter, leave and flush, and clears slot 2.
    Irq,
}

/// The whole alphabet.
pub const ALPHABET: [Sym; 15] = [
    Sym::Enter,
    Sym::Leave,
    Sym::Pause,
    Sym::Resume,
    Sym::Flush,
    Sym::Read,
    Sym::SetA,
    Sym::SetB,
    Sym::Bad,
    Sym::SetPtes2,
    Sym::Invlpg,
    Sym::Hook,
    Sym::Pin,
    Sym::Unpin,
    Sym::MapF,
];

/// The alphabet with two tasks and interrupts: [`ALPHABET`], a switch and an interrupt.
pub const TASK_ALPHABET: [Sym; 17] = {
    let mut all = [Sym::Switch; 17];
    let mut i = 0;
    while i < ALPHABET.len() {
        all[i] = ALPHABET[i];
        i += 1;
    }
    all[16] = Sym::Irq;
    all
};

/// What the exploration did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Programs checked: every program up to the length, over the whole alphabet.
    pub programs: u64,
    /// Of those, the ones actually run (the rest equal a shorter program after a no-op).
    pub executed: u64,
    /// Calls that reported refusals, and refusals reported.
    pub reports: u64,
    pub refusals: u64,
    /// Flushes in which a refusal held requests up (and the rest was replayed).
    pub replays: u64,
    /// Context switches and interrupts that came while the running task was batching.
    pub switches_in_sections: u64,
    pub interrupts_in_sections: u64,
}

/// A program that broke a rule.
#[derive(Clone, Debug)]
pub struct Failure {
    pub program: Vec<Sym>,
    pub message: String,
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "program {:?}: {}", self.program, self.message)
    }
}

/// Refusals a call must report, in order.
type Expected = Vec<(Request, XenError)>;

/// Both worlds after a prefix, and the reference's refusals not yet reported, per task.
struct Node<const E: usize, const R: usize> {
    lazy: LazyMmu<Model, E, R>,
    reference: Model,
    /// The running task (0 or 1) and the other one's saved lazy state.
    current: usize,
    saved: TaskLazy,
    outstanding: [Vec<(Request, XenError)>; 2],
}

/// The search keeps one node per depth and `clone_from`s each child into it: the batch's
/// arrays are reused, and only their used part is copied.
impl<const E: usize, const R: usize> Clone for Node<E, R> {
    fn clone(&self) -> Self {
        Node {
            lazy: self.lazy.clone(),
            reference: self.reference.clone(),
            current: self.current,
            saved: self.saved,
            outstanding: self.outstanding.clone(),
        }
    }

    fn clone_from(&mut self, src: &Self) {
        self.lazy.clone_from(&src.lazy);
        self.reference.clone_from(&src.reference);
        self.current = src.current;
        self.saved = src.saved;
        self.outstanding.clone_from(&src.outstanding);
    }
}

impl<const E: usize, const R: usize> Node<E, R> {
    fn root() -> (World, Self) {
        let mut model = Model::new();
        let world = World::new(&mut model);
        model.logging = false;
        let node = Node {
            lazy: LazyMmu::new(model.clone()),
            reference: model,
            current: 0,
            saved: TaskLazy::NEW,
            outstanding: [Vec::new(), Vec::new()],
        };
        (world, node)
    }
}

/// Check every program of length 1..=`max_len` over [`ALPHABET`] whose first call is in
/// `first` (a part of the alphabet, to split the work), on a batch of `E` entries and `R`
/// requests.
pub fn check_all<const E: usize, const R: usize>(
    max_len: usize,
    first: &[Sym],
) -> Result<Stats, Failure> {
    check_all_over::<E, R>(&ALPHABET, max_len, first)
}

/// [`check_all`] over any alphabet, e.g. [`TASK_ALPHABET`].
pub fn check_all_over<const E: usize, const R: usize>(
    alphabet: &'static [Sym],
    max_len: usize,
    first: &[Sym],
) -> Result<Stats, Failure> {
    let (world, root) = Node::<E, R>::root();
    let mut stats = Stats::default();
    let mut search = Search {
        world,
        alphabet,
        program: Vec::with_capacity(max_len),
        seen: BTreeMap::new(),
    };
    let mut nodes = alloc::vec![root; max_len + 1];
    for &sym in first {
        search.explore(&mut nodes, sym, max_len, &mut stats)?;
    }
    Ok(stats)
}

/// Check one program (of any length) on a batch of `E` entries and `R` requests, with the same
/// rules as [`check_all`]; for random long programs.
pub fn check_program<const E: usize, const R: usize>(program: &[Sym]) -> Result<Stats, Failure> {
    let (world, mut node) = Node::<E, R>::root();
    let mut stats = Stats::default();
    for (i, &sym) in program.iter().enumerate() {
        step(&world, &mut node, sym, &mut stats).map_err(|message| Failure {
            program: program[..=i].to_vec(),
            message,
        })?;
        stats.executed += 1;
    }
    stats.programs = 1;
    Ok(stats)
}

/// Programs of length 1..=n over an alphabet of `a` calls.
fn programs_up_to(a: usize, n: usize) -> u64 {
    (1..=n as u32).map(|k| (a as u64).pow(k)).sum()
}

struct Search {
    world: World,
    alphabet: &'static [Sym],
    program: Vec<Sym>,
    /// Settled states explored, with the calls that were left to go.
    seen: BTreeMap<Vec<u64>, usize>,
}

impl Search {
    /// `nodes[0]` is the parent; the child goes to `nodes[1]`, its children further on.
    fn explore<const E: usize, const R: usize>(
        &mut self,
        nodes: &mut [Node<E, R>],
        sym: Sym,
        budget: usize,
        stats: &mut Stats,
    ) -> Result<(), Failure> {
        self.program.push(sym);
        let (parent, rest_nodes) = nodes.split_at_mut(1);
        let node = &mut rest_nodes[0];
        node.clone_from(&parent[0]);
        let outcome = step(&self.world, node, sym, stats);
        stats.executed += 1;
        stats.programs += 1;
        let rest = budget - 1;
        let result = match outcome {
            Err(message) => Err(Failure {
                program: self.program.clone(),
                message,
            }),
            Ok(_) if rest == 0 => Ok(()),
            // Every extension equals the program without this call.
            Ok(Step::NoOp) => {
                stats.programs += programs_up_to(self.alphabet.len(), rest);
                Ok(())
            }
            Ok(Step::Changed) => match self.settled_key(&rest_nodes[0]) {
                Some(key) if self.seen.get(&key).is_some_and(|&b| b >= rest) => {
                    stats.programs += programs_up_to(self.alphabet.len(), rest);
                    Ok(())
                }
                key => {
                    if let Some(key) = key {
                        self.seen.insert(key, rest);
                    }
                    self.alphabet
                        .iter()
                        .try_for_each(|&next| self.explore(rest_nodes, next, rest, stats))
                }
            },
        };
        self.program.pop();
        result
    }

    /// The state of a settled node (nothing queued or waiting to be reported), `None` otherwise.
    fn settled_key<const E: usize, const R: usize>(&self, node: &Node<E, R>) -> Option<Vec<u64>> {
        let lazy = &node.lazy;
        let waiting = lazy.pending_refusals() + node.saved.pending_refusals();
        if lazy.queued_entries() > 0
            || waiting > 0
            || node.outstanding.iter().any(|o| !o.is_empty())
        {
            return None;
        }
        let (state, other) = (lazy.state(), node.saved.state());
        let model = lazy.hypervisor();
        let mut key = Vec::with_capacity(40);
        key.push(
            (node.current as u64) << 32
                | u64::from(other.enable) << 24
                | u64::from(other.pause) << 16
                | u64::from(state.enable) << 8
                | u64::from(state.pause),
        );
        for ptr in [
            self.world.slot(0).0,
            self.world.slot(1).0,
            self.world.hook_ptr,
        ] {
            key.push(model.read_pte(ptr).map_or(u64::MAX, |p| p.raw()));
        }
        model.type_digest(&mut key);
        Some(key)
    }
}

pub(crate) enum Step {
    NoOp,
    Changed,
}
