//! Tasks and the context-switch rule for lazy MMU state: switching a task out flushes what it
//! queued (no queued write crosses a switch) and keeps its depth and its refusals with it;
//! the next task starts from its own state; switching back in resumes batching at the depth
//! the task had.
//!
//! Two tasks take turns with `yield_now`, so each check runs at a known point of the other.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use lazy_mmu::MmuError;

use super::util::{check_mapped, marked_region};
use crate::framework::runner::{Context, TestFail, TestOutcome};
use crate::mm::pte;
use crate::mm::region::{Map, Region};
use crate::sched;
use crate::xen::events::IrqMutex;
use crate::xen::time;

type Log = Arc<IrqMutex<Vec<String>>>;

fn note(log: &Log, what: String) {
    log.lock().push(what);
}

/// The scenarios task A yields in: (label, sections entered, paused).
const SCENARIOS: [(&str, u32, bool); 5] = [
    ("depth 0", 0, false),
    ("depth 1", 1, false),
    ("depth 2", 2, false),
    ("depth 3", 3, false),
    ("paused at depth 1", 1, true),
];

fn task_a(r: &Region, log: &Log) -> Result<(), String> {
    for (i, &(label, depth, paused)) in SCENARIOS.iter().enumerate() {
        let page = i as u64;
        for _ in 0..depth {
            pte::enter().map_err(|e| format!("{label}: enter: {e}"))?;
        }
        if paused {
            pte::pause().map_err(|e| format!("{label}: pause: {e}"))?;
        }
        r.set_pte(page, Map::Frame(page % 4))
            .map_err(|e| format!("{label}: set_pte: {e}"))?;
        let before = pte::lazy_state();
        let batching = depth > 0 && !paused;
        if pte::queued().1 != usize::from(batching) {
            return Err(format!(
                "{label}: queued {:?} before the switch",
                pte::queued()
            ));
        }
        note(log, format!("A {label}: yield"));
        sched::yield_now();
        let after = pte::lazy_state();
        if after != before {
            return Err(format!(
                "{label}: state {before:?} before the switch, {after:?} after"
            ));
        }
        // Batching resumed at the same depth: the next write is queued again.
        r.set_pte(page + 8, Map::Frame(page % 4))
            .map_err(|e| format!("{label}: set_pte after: {e}"))?;
        if pte::queued().1 != usize::from(batching) {
            return Err(format!(
                "{label}: queued {:?} after the switch",
                pte::queued()
            ));
        }
        if paused {
            pte::resume();
        }
        for _ in 0..depth {
            pte::leave().map_err(|e| format!("{label}: leave: {e}"))?;
        }
    }
    Ok(())
}

fn task_b(a: &Region, own: &Region, log: &Log) -> Result<(), String> {
    for (i, &(label, _, _)) in SCENARIOS.iter().enumerate() {
        let page = i as u64;
        // A just yielded: its write must be live, and this task starts from its own state.
        let live = a.live_pte(page).map_err(|e| e.to_string())?;
        let want = a.value(Map::Frame(page % 4)).map_err(|e| e.to_string())?;
        if live.mfn() != want.mfn() || !live.is_present() {
            return Err(format!(
                "{label}: A's write is not live after its switch-out: {live}"
            ));
        }
        let s = pte::lazy_state();
        if s.enable != 0 || s.pause != 0 || pte::queued() != (0, 0) {
            return Err(format!(
                "{label}: B runs with A's state {s:?}, queued {:?}",
                pte::queued()
            ));
        }
        // A section of B's own, between A's halves.
        let section = pte::LazySection::enter().map_err(|e| e.to_string())?;
        own.set_pte(page, Map::Frame(0))
            .map_err(|e| e.to_string())?;
        section
            .leave()
            .map_err(|e| format!("{label}: B's leave: {e}"))?;
        note(log, format!("B {label}: checked"));
        sched::yield_now();
    }
    Ok(())
}

fn run_pair(
    a: impl FnOnce() -> Result<(), String> + Send + 'static,
    b: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> TestOutcome {
    let errors: Log = Arc::new(IrqMutex::new(Vec::new()));
    let (ea, eb) = (errors.clone(), errors.clone());
    sched::spawn("task-a", move || {
        if let Err(e) = a() {
            ea.lock().push(format!("task-a: {e}"));
        }
    });
    sched::spawn("task-b", move || {
        if let Err(e) = b() {
            eb.lock().push(format!("task-b: {e}"));
        }
    });
    sched::join_all();
    let errors = core::mem::take(&mut *errors.lock());
    ensure!(errors.is_empty(), "{}", errors.join("; "));
    Ok(())
}

/// A switch at depth 0, 1, 2, 3 and while paused, each with a write queued or issued.
pub fn switch_depths(_ctx: &Context) -> TestOutcome {
    let ra = Arc::new(marked_region(16, 4)?);
    let rb = Arc::new(marked_region(16, 4)?);
    let log: Log = Arc::new(IrqMutex::new(Vec::new()));
    let before = sched::stats();
    let (a1, a2, la, lb) = (ra.clone(), ra.clone(), log.clone(), log.clone());
    let b = rb.clone();
    run_pair(move || task_a(&a1, &la), move || task_b(&a2, &b, &lb))?;
    let s = sched::stats();
    println!(
        "    {} switches, {} inside lazy sections (depth 1: {}, depth >= 2: {}, paused: {})",
        s.switches - before.switches,
        s.in_lazy - before.in_lazy,
        s.at_depth1 - before.at_depth1,
        s.at_depth2 - before.at_depth2,
        s.paused - before.paused
    );
    ensure_eq!(
        (
            s.at_depth1 - before.at_depth1,
            s.at_depth2 - before.at_depth2,
            s.paused - before.paused
        ),
        (1, 2, 1),
        "switches of A inside sections (depth 1, depth >= 2, paused)"
    );
    for i in 0..SCENARIOS.len() as u64 {
        check_mapped(&ra, i, i % 4)?;
        check_mapped(&ra, i + 8, i % 4)?;
        check_mapped(&rb, i, 0)?;
    }
    Ok(())
}

/// A refused write queued by task A and flushed by A's switch-out is reported to A by its own
/// outermost leave, not to task B, whose section in between reports nothing.
pub fn refusal_stays_with_task(_ctx: &Context) -> TestOutcome {
    let ra = Arc::new(marked_region(16, 4)?);
    let rb = Arc::new(marked_region(16, 4)?);
    let a = ra.clone();
    let (b, a_seen_by_b) = (rb.clone(), ra.clone());
    run_pair(
        move || {
            pte::enter().map_err(|e| e.to_string())?;
            a.set_pte(0, Map::Frame(1)).map_err(|e| e.to_string())?;
            a.set_pte(1, Map::TableWritable(0))
                .map_err(|e| e.to_string())?;
            a.set_pte(2, Map::Frame(2)).map_err(|e| e.to_string())?;
            sched::yield_now();
            match pte::leave() {
                Err(MmuError::Refused(f)) if f.count == 1 => Ok(()),
                other => Err(format!(
                    "A's leave: expected its one refusal, got {other:?}"
                )),
            }
        },
        move || {
            // A's batch was flushed by its switch-out: its good writes are live.
            let live = a_seen_by_b.live_pte(2).map_err(|e| e.to_string())?;
            if !live.is_present() {
                return Err(String::from("A's write after the refused one is not live"));
            }
            let section = pte::LazySection::enter().map_err(|e| e.to_string())?;
            b.set_pte(0, Map::Frame(3)).map_err(|e| e.to_string())?;
            section
                .leave()
                .map_err(|e| format!("B's leave reported A's refusal: {e}"))?;
            pte::flush().map_err(|e| format!("B's flush reported A's refusal: {e}"))
        },
    )?;
    check_mapped(&ra, 0, 1)?;
    check_mapped(&ra, 2, 2)?;
    check_mapped(&rb, 0, 3)?;
    Ok(())
}

/// A task that panics is reported with its name (crashes: run by name).
pub fn bug_task_panic(_ctx: &Context) -> TestOutcome {
    sched::spawn("doomed", || panic!("this task panics on purpose"));
    sched::join_all();
    Err(TestFail::Failed(String::from(
        "the panicking task came back",
    )))
}

/// A task preempted by the timer inside a section at depth 2 with a write queued: the switch
/// flushes the write and the task resumes at depth 2. Under `lazy=was-lazy-flag` this is Linux
/// 2023-2025's `BUG` in `enter_lazy(XEN_LAZY_CPU)` (crashes).
pub fn preempt_nested(_ctx: &Context) -> TestOutcome {
    let r = Arc::new(marked_region(16, 4)?);
    let done = Arc::new(AtomicBool::new(false));
    let (h, d1, d2) = (r.clone(), done.clone(), done.clone());
    let a = move || -> Result<(), String> {
        let result = (|| {
            pte::enter().map_err(|e| e.to_string())?;
            pte::enter().map_err(|e| e.to_string())?;
            h.set_pte(0, Map::Frame(1)).map_err(|e| e.to_string())?;
            let (p0, t0) = (sched::stats().preemptions, time::now_ns());
            while sched::stats().preemptions == p0 {
                if time::now_ns() > t0 + 2_000_000_000 {
                    return Err(String::from("not preempted within 2 s"));
                }
                core::hint::spin_loop();
            }
            let s = pte::lazy_state();
            if (s.enable, s.pause) != (2, 0) {
                return Err(format!("resumed with {s:?}, expected depth 2"));
            }
            if !h.live_pte(0).map_err(|e| e.to_string())?.is_present() {
                return Err(String::from(
                    "the queued write was not flushed at the switch-out",
                ));
            }
            pte::leave().map_err(|e| e.to_string())?;
            pte::leave().map_err(|e| e.to_string())
        })();
        d1.store(true, Ordering::Relaxed);
        result
    };
    let b = move || -> Result<(), String> {
        while !d2.load(Ordering::Relaxed) {
            core::hint::spin_loop();
        }
        Ok(())
    };
    sched::with_preemption(1000, || run_pair(a, b))
        .map_err(|e| TestFail::Failed(format!("timer: {e}")))??;
    check_mapped(&r, 0, 1)
}
