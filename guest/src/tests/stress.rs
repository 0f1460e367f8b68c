//! Test 7: seeded random lazy-MMU programs (the same generator the host property tests use)
//! against real Xen, with the live tables compared to an eager shadow after every leave. The
//! programs include writes Xen refuses and queued TLB flushes: each refusal must be reported
//! once, where the batching ends, and everything else must take effect in order.
//! Options: `seed=N ops=M depth=D`.

use alloc::vec::Vec;

use hypercalls::XenError;

use crate::mm::frames::{self, Frame};
use crate::mm::lazy::{FlushReason, LazyMmu};
use crate::mm::pagetable;
use crate::mm::pte::{self, KERNEL_RW, Pte, PtePtr};
use crate::mm::xen_hv::XenHv;
use crate::stress::{self, GenOptions, Layout};
use crate::testing::{Context, TestFail, TestOutcome, failed};
use crate::xen::PAGE_SIZE;
use crate::{ensure, ensure_eq};

const TABLES: usize = 2;
const SLOTS: usize = TABLES * 512;
const FRAMES: usize = 512;

struct LiveLayout {
    base: u64,
    tables: [PtePtr; TABLES],
    frames: Vec<Frame>,
    /// Bits Xen adds to a kernel L1 entry we write (USER, and its own guest-kernel bit): the
    /// value read back is what the shadow must hold.
    added_by_xen: u64,
}

impl Layout for LiveLayout {
    fn pte_ptr(&self, slot: usize) -> u64 {
        self.tables[slot / 512].offset((slot % 512) as u64).0
    }

    fn va(&self, slot: usize) -> u64 {
        self.base + slot as u64 * PAGE_SIZE
    }

    fn pte_value(&self, frame: usize) -> u64 {
        Pte::from_mfn(self.frames[frame].mfn, KERNEL_RW).0 | self.added_by_xen
    }

    /// A writable mapping of our first L1 table: Xen refuses it (-EBUSY) in every slot.
    fn bad_value(&self) -> u64 {
        Pte::from_mfn(self.tables[0].0 >> 12, KERNEL_RW).0
    }
}

/// Run `program` through `lazy`, comparing the live tables with the shadow after every leave;
/// returns how many leaves were checked.
fn run_checked<const E: usize, const R: usize>(
    lazy: &mut LazyMmu<XenHv, E, R>,
    layout: &LiveLayout,
    program: &[stress::Op],
    label: &str,
    seed: u64,
) -> Result<u64, TestFail> {
    let mut checks = 0u64;
    let stats = stress::run(lazy, layout, program, |lazy, shadow| {
        checks += 1;
        stress::compare(lazy, layout, shadow, SLOTS)
    })
    .map_err(|e| failed(alloc::format!("{label}, seed {seed}: {e}")))?;
    ensure!(
        stats.refused_writes > 0,
        "{label}: no refused write in the program"
    );
    // Xen's reason for refusing a writable mapping of a page table (get_page_from_l1e).
    ensure_eq!(
        stats.refusal_error,
        Some(XenError::Busy),
        "{label}: refusal error"
    );
    println!(
        "    {label}: {} ops, {} writes ({} batched, {} immediate), {} reads ({} hazards), max depth {}, {checks} leaves checked",
        stats.ops,
        stats.writes,
        stats.batched_writes,
        stats.immediate_writes,
        stats.reads,
        stats.hazard_reads,
        stats.max_depth,
    );
    println!(
        "      {} refused writes ({}), {} refusals reported ({} by outermost leaves, {} by flushes, {} by pauses, {} at once, at most {} by one call); {} TLB ops ({} batched)",
        stats.refused_writes,
        stats.refusal_error.map_or("-", XenError::name),
        stats.reported_refusals,
        stats.reported_by_leave,
        stats.reported_by_flush,
        stats.reported_by_pause,
        stats.reported_at_once,
        stats.most_reported_by_one_call,
        stats.tlb_ops,
        stats.batched_tlb_ops,
    );
    print!(
        "      {} hypercalls ({} inside lazy sections); flushes:",
        stats.hypercalls, stats.lazy_hypercalls
    );
    for r in FlushReason::ALL {
        print!(" {}={}", r.name(), stats.flushes_for(r));
    }
    println!();
    Ok(checks)
}

pub fn stress(ctx: &Context) -> TestOutcome {
    let o = ctx.options;
    let base = super::lazy_mmu::region(9);
    let mut tables = [PtePtr(0); TABLES];
    for (t, slot) in tables.iter_mut().enumerate() {
        *slot = pagetable::ensure_l1(base + (t as u64) * 512 * PAGE_SIZE).map_err(failed)?;
    }
    let frames: Vec<Frame> = (0..FRAMES)
        .map(|_| frames::alloc_zeroed())
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    // Learn what Xen adds to a kernel mapping by writing one and reading it back.
    let probe = Pte::from_mfn(frames[0].mfn, KERNEL_RW);
    pte::set_pte(tables[0], probe, base).map_err(failed)?;
    let stored = pte::ptep_get(tables[0]).map_err(failed)?;
    pte::set_pte(tables[0], Pte::NONE, base).map_err(failed)?;
    ensure_eq!(
        stored.0 & !0xfff0_0000_0000_0fff,
        probe.0 & !0xfff0_0000_0000_0fff,
        "frame read back"
    );
    let layout = LiveLayout {
        base,
        tables,
        frames,
        added_by_xen: stored.0 & !probe.0,
    };
    let program = stress::generate_with(
        o.seed,
        o.ops as usize,
        o.depth,
        SLOTS,
        FRAMES,
        GenOptions::ALL,
    );
    // The kernel's own per-vCPU batch, then a tiny one (4 entries, 16 requests) so that
    // full-buffer flushes happen all the time against real Xen too.
    let checks =
        pte::with_lazy(|l| run_checked(l, &layout, &program, "per-vCPU batch (64/1024)", o.seed))?;
    let mut tiny: LazyMmu<XenHv, 4, 16> = LazyMmu::new(XenHv);
    let tiny_checks = run_checked(&mut tiny, &layout, &program, "tiny batch (4/16)", o.seed)?;
    ensure!(checks > 0 && tiny_checks > 0, "no leave was checked");
    ensure!(
        tiny.counters().flushes_for(FlushReason::Full) > 0,
        "the tiny batch never filled"
    );
    ensure!(
        !pte::is_active(),
        "lazy mode still active after a balanced program"
    );
    // Leave the region clean for the next run.
    let section = pte::LazySection::enter();
    for slot in 0..SLOTS {
        pte::set_pte(PtePtr(layout.pte_ptr(slot)), Pte::NONE, layout.va(slot)).map_err(failed)?;
    }
    pte::flush_tlb_local().map_err(failed)?;
    section.leave().map_err(failed)?;
    for f in layout.frames {
        frames::free(f);
    }
    Ok(())
}
