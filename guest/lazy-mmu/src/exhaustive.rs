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
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hypercalls::abi::pt_update;
use hypercalls::{MachAddr, Pte, XenError};
use x86_64::VirtAddr;

use crate::context::TaskLazy;
use crate::hypervisor::Hypervisor;
use crate::model::{ACCESSED, Model, PRESENT, RW, Space, USER, mfn, table_index};
use crate::program::Layout;
use crate::report::MmuError;
use crate::request::{Request, TableLevel, TableOp};
use crate::state::LazyMmu;

/// One call of the alphabet.
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

/// The alphabet with two tasks and interrupts.
pub const TASK_ALPHABET: [Sym; 17] = [
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
    Sym::Switch,
    Sym::Irq,
];

/// The little address space every program runs in.
#[derive(Clone)]
struct World {
    space: Space,
    spare: u64,
    hook_ptr: MachAddr,
}

impl World {
    fn new(model: &mut Model) -> World {
        let space = model.build_space(1, 4);
        let spare = model.alloc();
        let after_spare = model.alloc();
        assert_eq!(
            after_spare,
            spare + 1,
            "the model hands out consecutive frames"
        );
        // The L2 entry after the one holding the space's L1 table.
        let l2_index = table_index(Space::BASE_VA, 2) as u64 + 1;
        let hook_ptr = MachAddr::new_truncate((space.l2 << 12) + l2_index * 8);
        model.reset_stats();
        World {
            space,
            spare,
            hook_ptr,
        }
    }

    fn data(&self, i: usize) -> Pte {
        self.space.pte_value(i)
    }

    fn spare_writable(&self) -> Pte {
        Pte::from_raw(Space::pte(self.spare, Space::DATA_FLAGS))
    }

    fn spare_as_table(&self) -> Pte {
        Pte::from_raw(Space::pte(self.spare, PRESENT | RW | USER | ACCESSED))
    }

    fn slot(&self, s: usize) -> (MachAddr, VirtAddr) {
        (self.space.pte_ptr(s), self.space.va(s))
    }

    /// The requests `sym` makes, in order (empty for calls that make none).
    fn requests(&self, sym: Sym) -> Vec<Request> {
        let set = |s: usize, val: Pte| {
            let (ptr, va) = self.slot(s);
            Request::SetPte { ptr, val, va }
        };
        let f = mfn(self.spare);
        match sym {
            Sym::SetA => [set(0, self.data(0))].to_vec(),
            Sym::SetB => [set(1, self.data(1))].to_vec(),
            Sym::Bad => [set(0, self.space.bad_value())].to_vec(),
            Sym::SetPtes2 => {
                let first = self.spare_writable();
                [set(0, first), set(1, first.with_mfn(mfn(self.spare + 1)))].to_vec()
            }
            Sym::MapF => [set(1, self.spare_writable())].to_vec(),
            Sym::Invlpg => [Request::TableOp(TableOp::InvlpgLocal(self.slot(0).1))].to_vec(),
            Sym::Hook => [Request::SetTableEntry {
                ptr: self.hook_ptr,
                val: self.spare_as_table(),
            }]
            .to_vec(),
            Sym::Pin => [Request::TableOp(TableOp::Pin(TableLevel::L1, f))].to_vec(),
            Sym::Unpin => [Request::TableOp(TableOp::Unpin(f))].to_vec(),
            _ => Vec::new(),
        }
    }
}

/// Issue one request at once (the reference).
fn issue(model: &mut Model, request: Request) -> Result<(), XenError> {
    match request {
        Request::SetPte { ptr, val, .. } | Request::SetTableEntry { ptr, val } => model
            .mmu_update(&[pt_update(ptr, val)])
            .map_err(|e| e.error),
        Request::TableOp(op) => model.mmuext_op(&[op.to_mmuext()]).map_err(|e| e.error),
        Request::UpdateVaMapping { va, val, flags } => model.update_va_mapping(va, val, flags),
    }
}

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
#[derive(Clone)]
struct Node<const E: usize, const R: usize> {
    lazy: LazyMmu<Model, E, R>,
    reference: Model,
    /// The running task (0 or 1) and the other one's saved lazy state.
    current: usize,
    saved: TaskLazy,
    outstanding: [Vec<(Request, XenError)>; 2],
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
    for &sym in first {
        search.explore(&root, sym, max_len, &mut stats)?;
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
    fn explore<const E: usize, const R: usize>(
        &mut self,
        parent: &Node<E, R>,
        sym: Sym,
        budget: usize,
        stats: &mut Stats,
    ) -> Result<(), Failure> {
        self.program.push(sym);
        let mut node = parent.clone();
        let outcome = step(&self.world, &mut node, sym, stats);
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
            Ok(Step::Changed) => match self.settled_key(&node) {
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
                        .try_for_each(|&next| self.explore(&node, next, rest, stats))
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

enum Step {
    NoOp,
    Changed,
}

/// Run `sym` on both worlds and check the rules.
fn step<const E: usize, const R: usize>(
    world: &World,
    node: &mut Node<E, R>,
    sym: Sym,
    stats: &mut Stats,
) -> Result<Step, String> {
    let lazy = &mut node.lazy;
    let before = lazy.state();
    let counters = lazy.counters();
    let queued = (lazy.queued_entries(), lazy.queued_requests());
    let pending = lazy.pending_refusals();
    let active = before.is_active();

    // The reference: each request at once, in order.
    let requests = world.requests(sym);
    let mut refused = Vec::new();
    for r in &requests {
        if let Err(e) = issue(&mut node.reference, *r) {
            refused.push((*r, e));
        }
    }

    // The call under test, and which refusals it must report (`None`: none, not even an
    // empty report; it must succeed).
    let outermost_leave = before.pause == 0 && before.enable == 1;
    let (result, report): (Result<(), MmuError>, Option<Expected>) = match sym {
        Sym::Enter => (lazy.enter(), None),
        Sym::Leave if before.pause == 0 && before.enable == 0 => {
            let r = lazy.leave();
            if r != Err(MmuError::UnbalancedLeave) {
                return Err(format!("unbalanced leave returned {r:?}"));
            }
            (Ok(()), None)
        }
        Sym::Leave => (lazy.leave(), outermost_leave.then(Vec::new)),
        Sym::Pause => (
            lazy.pause(),
            (before.pause == 0 && before.enable > 0).then(Vec::new),
        ),
        Sym::Resume if before.pause == 0 => {
            let r = lazy.resume();
            if r != Err(MmuError::UnbalancedResume) {
                return Err(format!("unbalanced resume returned {r:?}"));
            }
            (Ok(()), None)
        }
        Sym::Resume => (lazy.resume(), None),
        Sym::Flush => (lazy.flush(), Some(Vec::new())),
        Sym::Read => {
            let (ptr, _) = world.slot(0);
            let found = lazy.read_pte(ptr).map_err(|e| format!("read: {e}"))?;
            let expected = node
                .reference
                .read_pte(ptr)
                .map_err(|e| format!("reference read: {e:?}"))?;
            if found != expected {
                return Err(format!("read {found}, the reference holds {expected}"));
            }
            (Ok(()), None)
        }
        Sym::Switch => {
            stats.switches_in_sections += u64::from(active);
            let out = lazy.switch_out().map_err(|e| format!("switch out: {e}"))?;
            lazy.switch_in(node.saved)
                .map_err(|e| format!("switch in: {e}"))?;
            node.saved = out;
            node.current ^= 1;
            (Ok(()), None)
        }
        Sym::Irq => {
            stats.interrupts_in_sections += u64::from(active);
            interrupt(world, lazy, &mut node.reference)?;
            (Ok(()), None)
        }
        Sym::SetPtes2 => {
            let (ptr, va) = world.slot(0);
            let first = world.spare_writable();
            let r = lazy.set_ptes(va, ptr, 2, |i| first.with_mfn(mfn(first.mfn().get() + i)));
            // Paused: issued at once; outside any section: its own leave is the outermost.
            let reports = !active;
            (r, reports.then(Vec::new))
        }
        _ => {
            let r = match requests.first() {
                Some(Request::SetPte { ptr, val, va }) => lazy.set_pte(*ptr, *val, *va),
                Some(Request::SetTableEntry { ptr, val }) => lazy.set_table_entry(*ptr, *val),
                Some(Request::TableOp(op)) => lazy.table_op(*op),
                _ => return Err(format!("{sym:?} makes no request")),
            };
            (r, (!active).then(Vec::new))
        }
    };

    // Where the reference's refusals go: to this call if nothing batched them, else to the
    // call that ends the batching.
    let batched = active && !requests.is_empty();
    let outstanding = &mut node.outstanding[node.current];
    if batched {
        outstanding.extend(refused.iter().copied());
    }
    match report {
        None => {
            if !refused.is_empty() && !batched {
                return Err(format!(
                    "{refused:?} refused, but this call reports nothing"
                ));
            }
            if let Err(e) = result {
                return Err(format!("unexpected error: {e}"));
            }
        }
        Some(_) => {
            let mut expected = core::mem::take(outstanding);
            if !batched {
                expected.extend(refused.iter().copied());
            }
            check_report(lazy, result, &expected)?;
            if !expected.is_empty() {
                stats.reports += 1;
                stats.refusals += expected.len() as u64;
            }
        }
    }

    let after = lazy.counters();
    let delta = after.since(&counters);
    stats.replays += delta.replays;
    let in_section = active && lazy.is_active() && sym != Sym::Irq;
    if in_section && delta.hypercalls > 0 && delta.flushes.iter().sum::<u64>() == 0 {
        return Err(format!(
            "{} hypercall(s) inside a lazy section without a flush",
            delta.hypercalls
        ));
    }
    if lazy.queued_entries() == 0 && !lazy.hypervisor().same_tables(&node.reference) {
        return Err(String::from(
            "the batch is empty but the tables differ from the reference",
        ));
    }
    let unchanged = delta.hypercalls == 0
        && requests.is_empty()
        && sym != Sym::Switch
        && lazy.state() == before
        && (lazy.queued_entries(), lazy.queued_requests()) == queued
        && lazy.pending_refusals() == pending;
    Ok(if unchanged { Step::NoOp } else { Step::Changed })
}

/// An interrupt: the handler maps its own slot 2, reads slot 0, tries the section calls, and
/// clears slot 2. Its writes go out at once; it leaves the interrupted state as it found it.
fn interrupt<const E: usize, const R: usize>(
    world: &World,
    lazy: &mut LazyMmu<Model, E, R>,
    reference: &mut Model,
) -> Result<(), String> {
    let before = lazy.state();
    let queued = lazy.queued_requests();
    let (ptr, va) = world.slot(2);
    let (slot0, _) = world.slot(0);
    let mapped = world.data(3);
    lazy.irq_enter();
    for val in [mapped, Pte::NONE] {
        lazy.set_pte(ptr, val, va)
            .map_err(|e| format!("handler write: {e}"))?;
        issue(reference, Request::SetPte { ptr, val, va })
            .map_err(|e| format!("reference handler write: {e}"))?;
        let live = lazy
            .hypervisor()
            .read_pte(ptr)
            .map_err(|e| format!("{e:?}"))?;
        if live != val {
            return Err(format!(
                "the handler's write of {val} is not live at once ({live})"
            ));
        }
        if val == mapped {
            let found = lazy
                .read_pte(slot0)
                .map_err(|e| format!("handler read: {e}"))?;
            let expected = reference.read_pte(slot0).map_err(|e| format!("{e:?}"))?;
            if found != expected {
                return Err(format!(
                    "handler read {found}, the reference holds {expected}"
                ));
            }
            let calls = [
                lazy.enter(),
                lazy.flush(),
                lazy.pause(),
                lazy.resume(),
                lazy.leave(),
            ];
            if let Some(Err(e)) = calls.iter().find(|r| r.is_err()) {
                return Err(format!("section call in a handler: {e}"));
            }
        }
    }
    lazy.irq_exit().map_err(|e| format!("{e}"))?;
    if lazy.state() != before || lazy.queued_requests() > queued {
        return Err(String::from(
            "the handler changed the interrupted lazy state or queue",
        ));
    }
    Ok(())
}

/// A reporting call returned exactly `expected`, in order.
fn check_report<const E: usize, const R: usize>(
    lazy: &LazyMmu<Model, E, R>,
    result: Result<(), MmuError>,
    expected: &[(Request, XenError)],
) -> Result<(), String> {
    match result {
        Ok(()) if expected.is_empty() => Ok(()),
        Ok(()) => Err(format!("reported nothing; expected {expected:?}")),
        Err(MmuError::Refused(r)) => {
            if r.count as usize != expected.len() {
                return Err(format!(
                    "reported {} refusal(s), expected {}: {expected:?} (first reported: {})",
                    r.count,
                    expected.len(),
                    r.first
                ));
            }
            let listed: Vec<(Option<Request>, XenError)> =
                lazy.last_refusals().map(|f| (f.request, f.error)).collect();
            let want: Vec<(Option<Request>, XenError)> = expected
                .iter()
                .take(crate::MAX_REPORTED)
                .map(|(r, e)| (Some(*r), *e))
                .collect();
            if listed != want {
                return Err(format!("listed {listed:?}, expected {want:?}"));
            }
            if lazy.last_refusals().next() != Some(&r.first) {
                return Err(format!(
                    "the error's first refusal {} is not listed first",
                    r.first
                ));
            }
            Ok(())
        }
        Err(e) => Err(format!("unexpected error: {e}")),
    }
}
