//! Seeded random lazy-MMU programs (the generator the host property tests use) against real
//! Xen on a region, with the live tables compared to an eager shadow after every leave. The
//! programs include writes Xen refuses and queued TLB flushes: each refusal must be reported
//! once, where the batching ends, and everything else must take effect in order.
//! Options: `seed=N ops=M depth=D`; a size the generator cannot make meaningful is an ERROR.

use hypercalls::XenError;
use lazy_mmu::FlushReason;
use lazy_mmu::program::{self, GenOptions};

use crate::framework::runner::{Context, TestFail, TestOutcome, failed};
use crate::mm::programs::{self, BatchSize, ProgramRun};
use crate::mm::pte;
use crate::mm::region::{Region, TABLE_PAGES};

const SLOTS: u64 = 2 * TABLE_PAGES;
const FRAMES: u64 = 512;

fn report(label: &str, run: &ProgramRun) {
    let s = &run.stats;
    println!(
        "    {label}: {} ops, {} writes ({} batched, {} immediate), {} reads ({} hazards), max depth {}, {} leaves checked",
        s.ops,
        s.writes,
        s.batched_writes,
        s.immediate_writes,
        s.reads,
        s.hazard_reads,
        s.max_depth,
        run.checks,
    );
    println!(
        "      {} refused writes ({}), {} refusals reported ({} by outermost leaves, {} by flushes, {} by pauses, {} at once, at most {} by one call); {} TLB ops ({} batched)",
        s.refused_writes,
        s.refusal_error.map_or("-", XenError::name),
        s.reported_refusals,
        s.reported_by_leave,
        s.reported_by_flush,
        s.reported_by_pause,
        s.reported_at_once,
        s.most_reported_by_one_call,
        s.tlb_ops,
        s.batched_tlb_ops,
    );
    print!(
        "      {} hypercalls ({} inside lazy sections); flushes:",
        s.hypercalls, s.lazy_hypercalls
    );
    for r in FlushReason::ALL {
        print!(" {}={}", r.name(), s.flushes_for(r));
    }
    println!();
}

pub fn stress(ctx: &Context) -> TestOutcome {
    let o = ctx.options;
    if let Err(e) = program::check(o.ops as usize, o.depth) {
        return Err(TestFail::Error(alloc::format!("{e}")));
    }
    let ops = program::generate_with(
        o.seed,
        o.ops as usize,
        o.depth,
        SLOTS as usize,
        FRAMES as usize,
        GenOptions::ALL,
    );
    let region = Region::new(SLOTS, FRAMES, 0).map_err(failed)?;
    for batch in [BatchSize::PerCpu, BatchSize::Tiny] {
        let label = batch.name();
        let run = programs::run(&region, &ops, batch)
            .map_err(|e| failed(alloc::format!("{label}, seed {}: {e}", o.seed)))?;
        report(label, &run);
        ensure!(run.checks > 0, "{label}: no leave was checked");
        ensure!(
            run.stats.refused_writes > 0,
            "{label}: no refused write in the program"
        );
        // Xen's reason for refusing a writable mapping of a page table (get_page_from_l1e).
        ensure_eq!(
            run.stats.refusal_error,
            Some(XenError::Busy),
            "{label}: refusal error"
        );
        if batch == BatchSize::Tiny {
            ensure!(
                programs::flushes(&run, FlushReason::Full) > 0,
                "the tiny batch never filled"
            );
        }
    }
    ensure!(
        !pte::is_active(),
        "lazy mode still active after a balanced program"
    );
    Ok(())
}
