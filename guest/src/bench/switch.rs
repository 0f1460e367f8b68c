//! What the context-switch rule costs: a switch with and without a lazy section open (the
//! section's batch flushed at the switch-out and batching resumed at the switch-in), and the
//! hypercalls of a `move_ptes()` of 4096 pages when the timer preempts it at 1 kHz versus
//! when nothing does.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};

use hypercalls::calls::issued;

use crate::arch::rdtsc;
use crate::framework::cmdline::Options;
use crate::mm::pte;
use crate::mm::region::{Map, Region};
use crate::sched;
use crate::xen::events;

const ROUNDS: u64 = 2000;
const MOVE_PAGES: u64 = 4096;

/// Two tasks yield to each other `ROUNDS` times; task A with a section open and one write
/// queued at every switch, or no section. (switches, hypercalls, cycles).
fn ping_pong(region: &Arc<Region>, lazy: bool) -> Result<(u64, u64, u64), String> {
    let r = region.clone();
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    let before = (sched::stats().switches, issued(), rdtsc());
    sched::spawn("bench-a", move || {
        let section = if lazy {
            pte::LazySection::enter().ok()
        } else {
            None
        };
        for i in 0..ROUNDS {
            if lazy && r.set_pte(i % 512, Map::Frame(i % 8)).is_err() {
                f.store(true, Ordering::Relaxed);
            }
            sched::yield_now();
        }
        if let Some(s) = section
            && s.leave().is_err()
        {
            f.store(true, Ordering::Relaxed);
        }
    });
    sched::spawn("bench-b", || {
        for _ in 0..ROUNDS {
            sched::yield_now();
        }
    });
    sched::join_all();
    let after = (sched::stats().switches, issued(), rdtsc());
    if failed.load(Ordering::Relaxed) {
        return Err(String::from("a write of the switch benchmark failed"));
    }
    Ok((after.0 - before.0, after.1 - before.1, after.2 - before.2))
}

/// Move 4096 mappings up by 4096 pages in one section, entry by entry (clear the old, set the
/// new), as Linux's `move_ptes()` does. Hypercalls the batch made.
fn move_ptes(r: &Region, back: bool) -> Result<u64, String> {
    let (from, to) = if back {
        (MOVE_PAGES, 0)
    } else {
        (0, MOVE_PAGES)
    };
    let c0 = pte::counters().hypercalls;
    let section = pte::LazySection::enter().map_err(|e| format!("{e}"))?;
    for i in 0..MOVE_PAGES {
        r.set_pte(from + i, Map::None).map_err(|e| format!("{e}"))?;
        r.set_pte(to + i, Map::Frame(i % 8))
            .map_err(|e| format!("{e}"))?;
    }
    section.leave().map_err(|e| format!("{e}"))?;
    Ok(pte::counters().hypercalls - c0)
}

pub fn rows(_options: &Options) -> Result<(), String> {
    let region = Arc::new(Region::new(2 * MOVE_PAGES, 8, 0).map_err(|e| format!("{e}"))?);
    for (label, lazy) in [("no section", false), ("section open", true)] {
        let (switches, hcalls, cycles) = ping_pong(&region, lazy)?;
        println!(
            "BENCH-SWITCH {label}: {switches} switches, {:.2} hypercalls and {} cycles per switch",
            hcalls as f64 / switches as f64,
            cycles / switches
        );
    }
    // Unpreempted, then preempted at 1 kHz by a task that only spins.
    for i in 0..MOVE_PAGES {
        region
            .set_pte(i, Map::Frame(i % 8))
            .map_err(|e| format!("{e}"))?;
    }
    let quiet = move_ptes(&region, false)?;
    let r = region.clone();
    let result = Arc::new(events::IrqMutex::new(None));
    let (res, done) = (result.clone(), Arc::new(AtomicBool::new(false)));
    let done2 = done.clone();
    let before = sched::stats();
    sched::spawn("move_ptes", move || {
        let h = move_ptes(&r, true);
        done.store(true, Ordering::Relaxed);
        *res.lock() = Some(h);
    });
    sched::spawn("spinner", move || {
        while !done2.load(Ordering::Relaxed) {
            core::hint::spin_loop();
        }
    });
    sched::with_preemption(1000, sched::join_all).map_err(|e| format!("timer: {e}"))?;
    let s = sched::stats();
    let preempted = result
        .lock()
        .take()
        .ok_or_else(|| String::from("move_ptes task did not report"))??;
    println!(
        "BENCH-SWITCH move_ptes of {MOVE_PAGES} pages: {quiet} hypercalls unpreempted, {preempted} preempted at 1 kHz ({} preemptions, {} inside the section)",
        s.preemptions - before.preemptions,
        s.in_lazy - before.in_lazy
    );
    Ok(())
}
