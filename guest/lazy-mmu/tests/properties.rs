//! Properties over random programs: stress programs from `lazy_mmu::program` (tables equal the
//! eager shadow, no stray hypercalls, hypercalls bounded, exactly the flushes and replays the
//! rules allow), and random walks over the exhaustive checker's alphabet (hooks, pins,
//! unpins, set_ptes, pauses) against strict in-order execution.
//!
//! `LAZY_MMU_CASES=N` multiplies every case count.

mod common;

use common::*;
use hypercalls::XenError;
use hypercalls::abi::{MMUEXT_INVLPG_LOCAL, MMUEXT_TLB_FLUSH_LOCAL};
use lazy_mmu::exhaustive::{ALPHABET, Sym, TASK_ALPHABET, check_program};
use lazy_mmu::model::{Call, Model, Space};
use lazy_mmu::program::{self, GenOptions, Layout, Observer, Op, RunStats, Shadow};
use lazy_mmu::{
    DEFAULT_ENTRIES, DEFAULT_REQUESTS, FlushReason, LINUX_ENTRIES, LINUX_REQUESTS, MAX_REPORTED,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestCaseError;

const TABLES: usize = 3;
const FRAMES: usize = 600;

/// Multiplier of every case count (`LAZY_MMU_CASES`, default 1).
fn scale(cases: u32) -> u32 {
    let m: u32 = std::env::var("LAZY_MMU_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    cases.saturating_mul(m.max(1))
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: scale(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// What the last queued entry is: coalescing depends on it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tail {
    None,
    Updates,
    TlbRun,
}

/// Checks run during a stress program. `check_tables`: the live tables equal the shadow
/// after every leave. `check_hypercalls`: every hypercall is one the rules allow, and no other.
struct Checker<'a> {
    space: &'a Space,
    check_tables: bool,
    check_hypercalls: bool,
    mark: usize,
    active: bool,
    paused: bool,
    /// The queue before the op: requests, entries, TLB ops, and the last entry's kind.
    queued: usize,
    entries: usize,
    ops: usize,
    tail: Tail,
    /// Hypercalls made again after a refusal held up later requests, on top of the batches.
    reissues: usize,
}

impl<'a> Checker<'a> {
    fn new(space: &'a Space, check_tables: bool, check_hypercalls: bool) -> Self {
        Checker {
            space,
            check_tables,
            check_hypercalls,
            mark: 0,
            active: false,
            paused: false,
            queued: 0,
            entries: 0,
            ops: 0,
            tail: Tail::None,
            reissues: 0,
        }
    }

    /// The hypercalls `op` made (`calls`), against what it may make given the state before it.
    fn check_calls<const E: usize, const R: usize>(
        &mut self,
        op: &Op,
        calls: &[Call],
    ) -> Result<(), String> {
        let reissues = &mut self.reissues;
        let mut flush = |calls: &[Call], entries: usize, requests: usize| {
            let made = flush_calls(calls, entries, requests)?;
            *reissues += made.saturating_sub(1);
            Ok::<usize, String>(made)
        };
        let (entries, queued) = (self.entries, self.queued);
        let one = |want: &dyn Fn(&Call) -> bool| match calls {
            [c] if want(c) => Ok(1),
            _ => Err("expected exactly one hypercall for the op itself".to_string()),
        };
        let made = match *op {
            Op::Enter | Op::Resume => 0,
            // While paused the queue is empty and leave does nothing.
            Op::Leave | Op::Flush => flush(calls, entries, queued)?,
            Op::Pause if self.active => flush(calls, entries, queued)?,
            Op::Pause => 0,
            // In a lazy section a write flushes only when the batch has no room for it.
            Op::SetPte { .. } | Op::Clear { .. } | Op::Bad { .. } if self.active => {
                if queued < R && (self.tail == Tail::Updates || entries < E) {
                    0
                } else {
                    flush(calls, entries, queued)?
                }
            }
            // A TLB op joins an open run of TLB ops while the op array has room.
            Op::FlushTlb | Op::Invlpg { .. } if self.active => {
                if self.ops < E && (self.tail == Tail::TlbRun || entries < E) {
                    0
                } else {
                    flush(calls, entries, queued)?
                }
            }
            Op::SetPte { .. } | Op::Clear { .. } | Op::Bad { .. } => {
                one(&|c| matches!(c, Call::MmuUpdate { reqs, .. } if reqs.len() == 1))?
            }
            Op::FlushTlb => one(
                &|c| matches!(c, Call::MmuextOp { ops, .. } if ops == &[(MMUEXT_TLB_FLUSH_LOCAL, 0)]),
            )?,
            Op::Invlpg { slot } => {
                let va = self.space.va(slot).as_u64();
                one(
                    &|c| matches!(c, Call::MmuextOp { ops, .. } if ops == &[(MMUEXT_INVLPG_LOCAL, va)]),
                )?
            }
            // Paused: all its writes in one mmu_update, at once.
            Op::SetPtes { nr, .. } if self.paused => {
                one(&|c| matches!(c, Call::MmuUpdate { reqs, .. } if reqs.len() == nr))?
            }
            // A flush whenever the batch has no room for the next request, then its own leave
            // flushes the rest.
            Op::SetPtes { nr, .. } => {
                let (mut e, mut q, mut tail) = (entries, queued, self.tail == Tail::Updates);
                let mut made = 0;
                for _ in 0..nr {
                    if !(q < R && (tail || e < E)) {
                        made += flush(&calls[made..], e, q)?;
                        (e, q, tail) = (0, 0, false);
                    }
                    if !tail {
                        e += 1;
                        tail = true;
                    }
                    q += 1;
                }
                made + flush(&calls[made..], e, q)?
            }
            // A read flushes only a batch holding a write to the entry it reads.
            Op::Read { slot } if self.active && !calls.is_empty() => {
                let ptr = self.space.pte_ptr(slot).get();
                if !calls[0].requests().iter().any(|&(p, _)| p & !7 == ptr) {
                    return Err(format!("a read of {ptr:#x} flushed: {:?}", calls[0]));
                }
                flush(calls, entries, queued)?
            }
            Op::Read { .. } => 0,
        };
        if made == calls.len() {
            Ok(())
        } else {
            let sizes: Vec<usize> = calls.iter().map(|c| c.requests().len()).collect();
            Err(format!(
                "hypercalls not allowed here (active {}, paused {}, {queued} requests in {entries} entries queued): {sizes:?} requests: {calls:?}",
                self.active, self.paused
            ))
        }
    }
}

/// One queued entry (or what is left of it), by content.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    Mmu(Vec<(u64, u64)>),
    Ext(Vec<(u32, u64)>),
    Uva(u64, u64, u64),
}

impl Shape {
    fn of(c: &Call) -> Option<Shape> {
        match c {
            Call::MmuUpdate { reqs, .. } => Some(Shape::Mmu(reqs.clone())),
            Call::MmuextOp { ops, .. } => Some(Shape::Ext(ops.clone())),
            Call::UpdateVaMapping { va, val, flags, .. } => Some(Shape::Uva(*va, *val, *flags)),
            Call::Multicall { .. } => None,
        }
    }

    /// What a refusal in `c` (of this shape) held up, if anything.
    fn held_up(&self, c: &Call) -> Option<Shape> {
        let (result, done) = match c {
            Call::MmuUpdate { result, done, .. } | Call::MmuextOp { result, done, .. } => {
                (*result, *done as usize)
            }
            _ => return None,
        };
        match self {
            Shape::Mmu(r) if result < 0 && done + 1 < r.len() => {
                Some(Shape::Mmu(r[done + 1..].to_vec()))
            }
            Shape::Ext(o) if result < 0 && done + 1 < o.len() => {
                Some(Shape::Ext(o[done + 1..].to_vec()))
            }
            _ => None,
        }
    }
}

/// Check that `calls` begin with the flush of a batch of `entries` entries holding `requests`
/// requests, and return how many calls that flush made: the batch itself (one multicall, or the
/// plain hypercall for a single entry), then, while a refused request held up the requests
/// behind it, everything from the request after it to the end of the batch again, as one
/// multicall (or the plain hypercall if one entry is left).
fn flush_calls(calls: &[Call], entries: usize, requests: usize) -> Result<usize, String> {
    if entries == 0 {
        return Ok(0);
    }
    let batch: Vec<Shape> = match calls.first() {
        Some(Call::Multicall { calls, result: 0 }) if entries > 1 => {
            calls.iter().filter_map(Shape::of).collect()
        }
        Some(c @ (Call::MmuUpdate { .. } | Call::MmuextOp { .. })) if entries == 1 => {
            vec![Shape::of(c).unwrap()]
        }
        c => {
            return Err(format!(
                "expected the flush of {entries} entries ({requests} requests), found {c:?}"
            ));
        }
    };
    let total: usize = batch
        .iter()
        .map(|s| match s {
            Shape::Mmu(r) => r.len(),
            _ => 0,
        })
        .sum();
    if batch.len() != entries || total != requests {
        return Err(format!(
            "expected a batch of {entries} entries and {requests} requests, found {batch:?}"
        ));
    }
    let mut todo = batch;
    let mut made = 0;
    loop {
        let Some(call) = calls.get(made) else {
            return Err(format!("the flush stopped with {todo:?} still to issue"));
        };
        made += 1;
        let ran: Vec<&Call> = match call {
            Call::Multicall { calls, result: 0 } if todo.len() > 1 => calls.iter().collect(),
            c if todo.len() == 1 => vec![c],
            c => return Err(format!("expected the issue of {todo:?}, found {c:?}")),
        };
        let shapes: Vec<Option<Shape>> = ran.iter().map(|c| Shape::of(c)).collect();
        if shapes.iter().zip(&todo).any(|(s, t)| s.as_ref() != Some(t)) || ran.len() != todo.len() {
            return Err(format!("expected the issue of {todo:?}, found {call:?}"));
        }
        let Some(at) = todo
            .iter()
            .zip(&ran)
            .position(|(t, c)| t.held_up(c).is_some())
        else {
            return Ok(made);
        };
        let rest = todo[at].held_up(ran[at]).unwrap();
        todo = std::iter::once(rest)
            .chain(todo[at + 1..].iter().cloned())
            .collect();
    }
}

impl<const E: usize, const R: usize> Observer<Model, E, R> for Checker<'_> {
    fn before_op(&mut self, _: usize, _: &Op, lazy: &Lazy<E, R>, _: &Shadow) {
        self.mark = lazy.hypervisor().log.len();
        self.active = lazy.is_active();
        self.paused = lazy.is_paused();
        self.queued = lazy.queued_requests();
        self.entries = lazy.queued_entries();
    }

    fn after_op(
        &mut self,
        _: usize,
        op: &Op,
        lazy: &mut Lazy<E, R>,
        _: &Shadow,
    ) -> Result<(), String> {
        let flushed = lazy.hypervisor().log.len() > self.mark;
        if self.check_hypercalls {
            self.check_calls::<E, R>(op, &lazy.hypervisor().log[self.mark..])?;
        }
        if lazy.queued_entries() == 0 {
            (self.tail, self.ops) = (Tail::None, 0);
        } else if self.active {
            match op {
                Op::SetPte { .. } | Op::Clear { .. } | Op::Bad { .. } => {
                    if flushed {
                        self.ops = 0;
                    }
                    self.tail = Tail::Updates;
                }
                Op::FlushTlb | Op::Invlpg { .. } => {
                    self.ops = if flushed { 1 } else { self.ops + 1 };
                    self.tail = Tail::TlbRun;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn after_leave(&mut self, lazy: &mut Lazy<E, R>, shadow: &Shadow) -> Result<(), String> {
        if !self.check_tables {
            return Ok(());
        }
        program::compare(lazy, self.space, shadow, self.space.slots())?;
        // The entries beyond those the shadow covers must still be clear.
        let model = lazy.hypervisor();
        for slot in shadow.len()..self.space.slots() {
            let found = lazy_mmu::Hypervisor::read_pte(model, self.space.pte_ptr(slot))
                .map_err(|e| format!("{e:?}"))?;
            if found.raw() != 0 {
                return Err(format!("slot {slot}: {found}, expected 0"));
            }
        }
        Ok(())
    }
}

fn gen_program(seed: u64, ops: usize, depth: u32, opts: GenOptions) -> Vec<Op> {
    program::generate_with(seed, ops, depth, TABLES * 512, FRAMES, opts)
}

/// (a) After every leave the tables equal the eager reference. With refusals, the runner also
/// checks that each is reported once, by the call that ends the batching.
fn tables_match_after_every_leave<const E: usize, const R: usize>(
    seed: u64,
    ops: usize,
    depth: u32,
    opts: GenOptions,
) -> Result<(), TestCaseError> {
    let (mut l, s) = setup::<E, R>(TABLES, FRAMES);
    let prog = gen_program(seed, ops, depth, opts);
    let mut checker = Checker::new(&s, true, false);
    let stats = program::run_with(&mut l, &s, &prog, &mut checker).map_err(TestCaseError::fail)?;
    prop_assert_eq!(stats.reported_refusals, stats.refused_writes as u64);
    if stats.refused_writes > 0 {
        prop_assert_eq!(stats.refusal_error, Some(XenError::Busy));
    }
    // Xen refused exactly the bad writes (the core's `rejected` counter misses refusals of
    // requests issued at once: see `refusals::the_rejected_counter_counts_refusals_issued_at_once`).
    let refused_by_xen: usize = l
        .hypervisor()
        .log
        .iter()
        .flat_map(|c| match c {
            Call::Multicall { calls, .. } => calls.clone(),
            c => vec![c.clone()],
        })
        .filter(|c| c.result() < 0)
        .count();
    prop_assert!(refused_by_xen >= stats.refused_writes);
    l.hypervisor().check_refcounts();
    Ok(())
}

/// (b) No hypercall inside a lazy section but for a full buffer or a read hazard (and the
/// reissues after a refusal in those flushes), or from ops that flush (leave, flush, pause,
/// and set_ptes() with its own leave).
fn no_hypercalls_inside_lazy_sections<const E: usize, const R: usize>(
    seed: u64,
    ops: usize,
    depth: u32,
    opts: GenOptions,
) -> Result<(), TestCaseError> {
    let (mut l, s) = setup::<E, R>(TABLES, FRAMES);
    let prog = gen_program(seed, ops, depth, opts);
    let mut checker = Checker::new(&s, false, true);
    let stats = program::run_with(&mut l, &s, &prog, &mut checker).map_err(TestCaseError::fail)?;
    let allowed = stats.flushes_for(FlushReason::Full)
        + stats.flushes_for(FlushReason::ReadHazard)
        + checker.reissues as u64;
    prop_assert!(
        stats.lazy_hypercalls <= allowed,
        "{} hypercalls inside lazy sections, {allowed} full/read-hazard flushes and reissues",
        stats.lazy_hypercalls
    );
    Ok(())
}

/// (c) Hypercalls for N batched writes and T batched TLB ops: at most ceil(N / R) full request
/// buffers plus ceil(T / (E / 2)) full entry or op buffers (entries alternate at worst, so a
/// full one holds at least E / 2 TLB ops), plus one per op that forces a flush, plus one per
/// immediate write or TLB op, plus the reissues after refusals (which the checker matches to
/// the replay the refusals call for).
fn hypercalls_are_bounded<const E: usize, const R: usize>(
    seed: u64,
    ops: usize,
    depth: u32,
    opts: GenOptions,
) -> Result<(), TestCaseError> {
    let (mut l, s) = setup::<E, R>(TABLES, FRAMES);
    let prog = gen_program(seed, ops, depth, opts);
    let mut checker = Checker::new(&s, false, true);
    let stats = program::run_with(&mut l, &s, &prog, &mut checker).map_err(TestCaseError::fail)?;
    let set_ptes = prog
        .iter()
        .filter(|op| matches!(op, Op::SetPtes { .. }))
        .count();
    let forced = stats.leaves + stats.flushes + stats.pauses + stats.hazard_reads + set_ptes;
    let full = stats.batched_writes.div_ceil(R) + stats.batched_tlb_ops.div_ceil(E.div_ceil(2));
    let immediate = stats.immediate_writes + stats.tlb_ops - stats.batched_tlb_ops;
    let bound = full + forced + immediate + checker.reissues;
    let made = l.hypervisor().counts.hypercalls();
    prop_assert!(
        made as usize <= bound,
        "{made} hypercalls for {} batched writes (capacity {R}), {} batched TLB ops ({E} entries), {forced} forced flushes, {immediate} immediate ops, {} reissues",
        stats.batched_writes,
        stats.batched_tlb_ops,
        checker.reissues
    );
    prop_assert_eq!(
        made,
        stats.hypercalls,
        "the lazy layer's count agrees with Xen's"
    );
    Ok(())
}

const PLAIN: GenOptions = GenOptions {
    refusals: false,
    tlb_ops: false,
};

/// Stress programs per property test (each up to 500 ops).
const STRESS_CASES: u32 = 96;

/// One proptest per line: a property, the queue's (entries, requests), the kind of programs.
macro_rules! property_tests {
    ($($name:ident: $property:ident($entries:expr, $requests:expr, $programs:expr);)*) => {
        proptest! {
            #![proptest_config(config(STRESS_CASES))]
            $(
                #[test]
                fn $name(seed in any::<u64>(), depth in 0u32..=8, ops in 1usize..500) {
                    $property::<{ $entries }, { $requests }>(seed, ops, depth, $programs)?;
                }
            )*
        }
    };
}

// Plain programs, then the same properties over programs with refused writes and queued TLB
// ops: the error path (report, then replay in queue order) under every queue size.
property_tests! {
    tables_match_shadow_small_queue: tables_match_after_every_leave(4, 16, PLAIN);
    tables_match_shadow_linux_queue: tables_match_after_every_leave(LINUX_ENTRIES, LINUX_REQUESTS, PLAIN);
    tables_match_shadow_default_queue: tables_match_after_every_leave(DEFAULT_ENTRIES, DEFAULT_REQUESTS, PLAIN);
    no_stray_hypercalls_small_queue: no_hypercalls_inside_lazy_sections(4, 16, PLAIN);
    no_stray_hypercalls_default_queue: no_hypercalls_inside_lazy_sections(DEFAULT_ENTRIES, DEFAULT_REQUESTS, PLAIN);
    hypercalls_bounded_small_queue: hypercalls_are_bounded(4, 16, PLAIN);
    hypercalls_bounded_default_queue: hypercalls_are_bounded(DEFAULT_ENTRIES, DEFAULT_REQUESTS, PLAIN);
    tables_match_shadow_with_refusals_small_queue: tables_match_after_every_leave(4, 16, GenOptions::ALL);
    tables_match_shadow_with_refusals_linux_queue: tables_match_after_every_leave(LINUX_ENTRIES, LINUX_REQUESTS, GenOptions::ALL);
    tables_match_shadow_with_refusals_default_queue: tables_match_after_every_leave(DEFAULT_ENTRIES, DEFAULT_REQUESTS, GenOptions::ALL);
    no_stray_hypercalls_with_refusals_small_queue: no_hypercalls_inside_lazy_sections(4, 16, GenOptions::ALL);
    no_stray_hypercalls_with_refusals_linux_queue: no_hypercalls_inside_lazy_sections(LINUX_ENTRIES, LINUX_REQUESTS, GenOptions::ALL);
    no_stray_hypercalls_with_refusals_default_queue: no_hypercalls_inside_lazy_sections(DEFAULT_ENTRIES, DEFAULT_REQUESTS, GenOptions::ALL);
    hypercalls_bounded_with_refusals_small_queue: hypercalls_are_bounded(4, 16, GenOptions::ALL);
    hypercalls_bounded_with_refusals_linux_queue: hypercalls_are_bounded(LINUX_ENTRIES, LINUX_REQUESTS, GenOptions::ALL);
    hypercalls_bounded_with_refusals_default_queue: hypercalls_are_bounded(DEFAULT_ENTRIES, DEFAULT_REQUESTS, GenOptions::ALL);
}

/// Programs with refusals reach every reporting call, more refusals in one report than it
/// lists, and the replay after a held-up refusal.
#[test]
fn programs_with_refusals_exercise_the_error_path() {
    let mut total = RunStats::default();
    let mut reissues = 0;
    for seed in 0..24 {
        let (mut l, s) = setup::<4, 16>(TABLES, FRAMES);
        let prog = gen_program(seed, 400, (seed % 4) as u32 + 1, GenOptions::ALL);
        let mut checker = Checker::new(&s, false, true);
        let stats = program::run_with(&mut l, &s, &prog, &mut checker).unwrap();
        total.reported_by_leave += stats.reported_by_leave;
        total.reported_by_flush += stats.reported_by_flush;
        total.reported_by_pause += stats.reported_by_pause;
        total.reported_at_once += stats.reported_at_once;
        total.most_reported_by_one_call = total
            .most_reported_by_one_call
            .max(stats.most_reported_by_one_call);
        reissues += checker.reissues;
    }
    assert!(total.reported_by_leave > 0 && total.reported_by_flush > 0);
    assert!(total.reported_by_pause > 0 && total.reported_at_once > 0);
    assert!(
        total.most_reported_by_one_call > MAX_REPORTED as u64,
        "{total:?}"
    );
    assert!(reissues > 0);
}

// ---- Random walks over the exhaustive checker's alphabet ----

/// Random programs per queue size (each up to 80 calls).
const WALK_CASES: u32 = 3000;

fn walk() -> impl Strategy<Value = Vec<Sym>> {
    prop::collection::vec(prop::sample::select(&ALPHABET[..]), 1..80)
}

/// Walks that open sections and pauses more often than they close them, so that most calls
/// batch (and hooks, pins and unpins queue behind other requests).
fn deep_walk() -> impl Strategy<Value = Vec<Sym>> {
    let weighted: Vec<(u32, Just<Sym>)> = ALPHABET
        .iter()
        .map(|&s| {
            let w = match s {
                Sym::Enter => 4,
                Sym::Leave | Sym::Resume | Sym::Flush => 1,
                _ => 3,
            };
            (w, Just(s))
        })
        .collect();
    prop::collection::vec(prop::strategy::Union::new_weighted(weighted), 1..80)
}

/// Deep walks over two tasks with context switches and interrupts at random points.
fn task_walk() -> impl Strategy<Value = Vec<Sym>> {
    let weighted: Vec<(u32, Just<Sym>)> = TASK_ALPHABET
        .iter()
        .map(|&s| {
            let w = match s {
                Sym::Enter => 4,
                Sym::Leave | Sym::Resume | Sym::Flush => 1,
                Sym::Switch | Sym::Irq => 3,
                _ => 2,
            };
            (w, Just(s))
        })
        .collect();
    prop::collection::vec(prop::strategy::Union::new_weighted(weighted), 1..120)
}

fn check<const E: usize, const R: usize>(program: &[Sym]) -> Result<(), TestCaseError> {
    check_program::<E, R>(program)
        .map(|_| ())
        .map_err(|f| TestCaseError::fail(f.to_string()))
}

proptest! {
    #![proptest_config(config(WALK_CASES))]

    /// One entry and two requests: almost every call flushes the batch as full.
    #[test]
    fn random_walks_match_strict_order_tiny_queue(program in walk()) {
        check::<1, 2>(&program)?;
    }

    #[test]
    fn random_walks_match_strict_order_small_queue(program in deep_walk()) {
        check::<4, 16>(&program)?;
    }

    #[test]
    fn random_walks_match_strict_order_default_queue(program in deep_walk()) {
        check::<DEFAULT_ENTRIES, DEFAULT_REQUESTS>(&program)?;
    }

    /// Two tasks and interrupts: every refusal reaches its own task, handlers never batch and
    /// leave the interrupted state as it was, no queued write crosses a switch.
    #[test]
    fn random_two_task_walks_with_interrupts_match_strict_order(program in task_walk()) {
        check::<4, 16>(&program)?;
    }
}

/// Two-task walks reach what they are for: switches inside active sections (with something
/// queued) and interrupts during them.
#[test]
fn two_task_walks_switch_and_interrupt_inside_sections() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut refusals, mut programs, mut switches, mut interrupts) = (0, 0, 0, 0);
    for _ in 0..300 {
        let program = task_walk().new_tree(&mut runner).unwrap().current();
        let stats = check_program::<4, 16>(&program).unwrap_or_else(|f| panic!("{f}"));
        refusals += stats.refusals;
        programs += stats.programs;
        switches += stats.switches_in_sections;
        interrupts += stats.interrupts_in_sections;
    }
    assert_eq!(programs, 300);
    assert!(
        refusals > 100 && switches > 300 && interrupts > 300,
        "{refusals} refusals, {switches} switches and {interrupts} interrupts inside sections"
    );
}

/// The walks reach what they are for: hooks, pins and unpins queued in an active section,
/// refusals reported, and replays after a held-up refusal.
#[test]
fn random_walks_reach_refusals_and_replays() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut refusals, mut replays, mut programs) = (0, 0, 0);
    for _ in 0..300 {
        let program = deep_walk().new_tree(&mut runner).unwrap().current();
        let stats = check_program::<4, 16>(&program).unwrap_or_else(|f| panic!("{f}"));
        refusals += stats.refusals;
        replays += stats.replays;
        programs += stats.programs;
    }
    assert_eq!(programs, 300);
    assert!(
        refusals > 100 && replays > 10,
        "{refusals} refusals, {replays} replays"
    );
}
