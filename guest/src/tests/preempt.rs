//! `preempt seed=N tasks=T hz=H ops=M depth=D`: T tasks each run a seeded lazy-MMU program
//! (the `stress` generator, refusals and TLB ops included) on their own region and on their
//! part of a region all tasks share, while the timer ticks at H Hz and preempts them on the way
//! out of the upcall, wherever they are: inside sections at any depth, paused, or outside.
//! The tick's handler writes a range of its own at every tick (at once: lazy mode is off in
//! interrupt context). Each op runs with the batch locked (events masked), so a task is
//! preempted between ops.
//!
//! Checked: after every outermost leave a task's slots equal its shadow, and its refusals are
//! reported to it by its own calls (the stepper's reporting rule); at random points each task
//! reads another task's shared slots, which must hold what that task's shadow said when it was
//! switched out (no queued write crosses a switch); at the end every range equals its
//! reference. A round in which no switch happened inside a lazy section, no upcall arrived
//! during one or the handler never wrote runs again with the next seed, up to 4 rounds; then
//! it fails.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use lazy_mmu::program::{self, GenOptions, Rng};

use crate::framework::runner::{Context, TestFail, TestOutcome, failed};
use crate::mm::programs::{TASK_SLOTS, TaskLayout, TaskProgram};
use crate::mm::region::{Map, Region, TABLE_PAGES};
use crate::sched;
use crate::xen::events::{self, IrqMutex};
use crate::xen::time;

/// Data frames the programs map (the shared region's).
const FRAMES: u64 = 64;
const NAMES: [&str; 8] = [
    "prog0", "prog1", "prog2", "prog3", "prog4", "prog5", "prog6", "prog7",
];
/// Pages and frames of the handler's range.
const IRQ_PAGES: u64 = 512;
const IRQ_FRAMES: u64 = 16;

/// The tick handler's writer: its own region and what it must hold.
struct IrqWriter {
    region: Arc<Region>,
    expected: Vec<Map>,
    writes: u64,
    error: Option<String>,
}

static IRQ_WRITER: IrqMutex<Option<IrqWriter>> = IrqMutex::new(None);

/// On every tick: one write to the handler's own range (issued at once).
fn irq_write() {
    let mut w = IRQ_WRITER.lock();
    let Some(w) = w.as_mut() else { return };
    if w.error.is_some() {
        return;
    }
    let n = w.writes;
    let page = n % IRQ_PAGES;
    let map = if (n / IRQ_PAGES).is_multiple_of(2) {
        Map::Frame(n % IRQ_FRAMES)
    } else {
        Map::None
    };
    match w.region.set_pte(page, map) {
        Ok(()) => {
            w.expected[page as usize] = map;
            w.writes += 1;
        }
        Err(e) => w.error = Some(format!("handler write {n}: {e}")),
    }
}

/// Shadow values of every task's shared part, as each task last published them (raw entries).
struct Published {
    values: Vec<AtomicU64>,
}

impl Published {
    fn slot(&self, part: u64, slot: usize) -> &AtomicU64 {
        &self.values[part as usize * TABLE_PAGES as usize + slot - TABLE_PAGES as usize]
    }
}

/// Which task, and how its program went.
type TaskResult = (u64, Result<TaskReport, String>);

struct TaskReport {
    checks: u64,
    cross_reads: u64,
    stats: program::RunStats,
}

fn run_task(
    me: u64,
    tasks: u64,
    seed: u64,
    mut prog: TaskProgram,
    shared: &Region,
    published: &Published,
) -> Result<TaskReport, String> {
    let mut rng = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut cross_reads = 0;
    while prog.remaining() > 0 {
        {
            // The op and its publication are one step for the others: no switch in between.
            let _irq = events::IrqGuard::new();
            let changed = prog.step()?;
            for slot in changed.filter(|&s| s >= TABLE_PAGES as usize) {
                published
                    .slot(me, slot)
                    .store(prog.expected(slot).raw(), Ordering::SeqCst);
            }
        }
        if tasks > 1 && rng.below(16) == 0 {
            // Another task is switched out: everything it wrote is live. The read and the
            // comparison are one step (no switch in between).
            let _irq = events::IrqGuard::new();
            let other = (me + 1 + rng.below(tasks as usize - 1) as u64) % tasks;
            let slot = TABLE_PAGES as usize + rng.below(TABLE_PAGES as usize);
            let page = TaskLayout::shared_page(other, slot);
            let live = shared.live_pte(page).map_err(|e| format!("{e}"))?;
            let want = published.slot(other, slot).load(Ordering::SeqCst);
            if live.raw() != want {
                return Err(format!(
                    "{}'s shared slot {slot} reads {live}, its shadow held {want:#x} when it was switched out",
                    NAMES[other as usize]
                ));
            }
            cross_reads += 1;
        }
    }
    let checks = prog.checks;
    let stats = prog.finish()?;
    Ok(TaskReport {
        checks,
        cross_reads,
        stats,
    })
}

/// Rounds of programs at most: a round in which no switch landed inside a section, no upcall
/// came during one or the handler never wrote is followed by another with the next seed. Every
/// round is checked in full; only this coverage can call for another.
const ROUNDS: u64 = 4;

pub fn preempt(ctx: &Context) -> TestOutcome {
    let o = ctx.options;
    if let Err(e) = program::check(o.ops as usize, o.depth) {
        return Err(TestFail::Error(format!("{e}")));
    }
    for round in 0..ROUNDS {
        let (k, u, w) = preempt_round(ctx, o.seed.wrapping_add(round))?;
        if k > 0 && u > 0 && w > 0 {
            return Ok(());
        }
        // A host that stalls this vCPU for milliseconds at a time folds the ticks it missed
        // into one interrupt, and a short program may then see none inside a section.
        println!("    round {round} left something untested: again with the next seed");
    }
    Err(failed(format!(
        "in {ROUNDS} rounds, no switch inside a lazy section, no upcall during one or no handler write"
    )))
}

/// One round: the tasks' programs with seeds from `seed`; (switches inside lazy sections,
/// upcalls during lazy sections, handler writes).
fn preempt_round(ctx: &Context, seed: u64) -> Result<(u64, u64, u64), TestFail> {
    let o = ctx.options;
    let tasks = o.tasks as u64;
    let shared = Arc::new(Region::new(tasks * TABLE_PAGES, FRAMES, 0).map_err(failed)?);
    let irq_region = Arc::new(Region::new(IRQ_PAGES, IRQ_FRAMES, 0).map_err(failed)?);
    let published = Arc::new(Published {
        values: (0..tasks * TABLE_PAGES)
            .map(|_| AtomicU64::new(0))
            .collect(),
    });
    let results: Arc<IrqMutex<Vec<TaskResult>>> = Arc::new(IrqMutex::new(Vec::new()));
    let mut owns = Vec::new();
    for t in 0..tasks {
        let own = Arc::new(Region::new(TABLE_PAGES, 1, 0).map_err(failed)?);
        let seed = seed.wrapping_add(t.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let ops = program::generate_with(
            seed,
            o.ops as usize,
            o.depth,
            TASK_SLOTS,
            FRAMES as usize,
            GenOptions::ALL,
        );
        let layout = TaskLayout::new(own.clone(), shared.clone(), t).map_err(failed)?;
        let prog = TaskProgram::new(layout, ops).map_err(failed)?;
        let (shared, published, results) = (shared.clone(), published.clone(), results.clone());
        sched::spawn(NAMES[t as usize], move || {
            let r = run_task(t, tasks, seed, prog, &shared, &published);
            // A program that failed half-way may have left sections open.
            let r = match (r, crate::mm::pte::reset_lazy_state()) {
                (Err(e), Some(open)) => Err(format!("{e} (left {open} open)")),
                (r, _) => r,
            };
            results.lock().push((t, r));
        });
        owns.push(own);
    }
    *IRQ_WRITER.lock() = Some(IrqWriter {
        region: irq_region.clone(),
        expected: alloc::vec![Map::None; IRQ_PAGES as usize],
        writes: 0,
        error: None,
    });
    time::add_hook(irq_write).map_err(|e| failed(format!("tick hook: {e}")))?;
    let before = sched::stats();
    let t0 = time::now_ns();
    let ticks0 = time::ticks();
    sched::with_preemption(o.hz, sched::join_all).map_err(|e| failed(format!("timer: {e}")))?;
    time::remove_hook(irq_write);
    let ms = (time::now_ns() - t0) / 1_000_000;
    let ticks = time::ticks() - ticks0;
    let writer = IRQ_WRITER.lock().take().expect("the writer was installed");
    let s = sched::stats();
    let k = s.in_lazy - before.in_lazy;
    let u = s.upcalls_in_lazy - before.upcalls_in_lazy;
    let w = writer.writes;

    let mut results = core::mem::take(&mut *results.lock());
    results.sort_by_key(|(t, _)| *t);
    let mut problems: Vec<String> = Vec::new();
    for (t, r) in &results {
        match r {
            Ok(rep) => println!(
                "    {}: {} ops, {} writes ({} refused, all reported to it), max depth {}, {} outermost leaves checked, {} reads of other tasks' slots",
                NAMES[*t as usize],
                rep.stats.ops,
                rep.stats.writes,
                rep.stats.refused_writes,
                rep.stats.max_depth,
                rep.checks,
                rep.cross_reads
            ),
            Err(e) => problems.push(format!("{}: {e}", NAMES[*t as usize])),
        }
    }
    if results.len() as u64 != tasks {
        problems.push(format!("{} of {tasks} tasks reported", results.len()));
    }
    if let Some(e) = &writer.error {
        problems.push(e.clone());
    }
    for (page, map) in writer.expected.iter().enumerate() {
        let want = irq_region.value(*map).map_err(failed)?;
        let live = irq_region.live_pte(page as u64).map_err(failed)?;
        if live.is_present() != want.is_present() || (want.is_present() && live.mfn() != want.mfn())
        {
            problems.push(format!("handler page {page}: {live}, expected {want}"));
            break;
        }
    }
    println!(
        "    {tasks} tasks, {ticks} ticks at {} Hz in {ms} ms; {} switches ({} preemptions; in sections: {} at depth 1, {} at depth >= 2, {} paused)",
        o.hz,
        s.switches - before.switches,
        s.preemptions - before.preemptions,
        s.at_depth1 - before.at_depth1,
        s.at_depth2 - before.at_depth2,
        s.paused - before.paused
    );
    println!(
        "switches inside lazy sections: {k}, upcalls during lazy sections: {u}, handler writes: {w}"
    );
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    drop(owns);
    drop(shared);
    Ok((k, u, w))
}
