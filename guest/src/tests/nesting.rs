//! Nested lazy sections: the `move_ptes()` scenario that killed Xen PV guests in 2023 (generic
//! `set_ptes()` enters and leaves inside `move_ptes()`'s section), deep nesting where every
//! leave flushes, and an unbalanced leave (a BUG, run by name).

use hypercalls::calls::issued;
use lazy_mmu::FlushReason;

use super::util::{check_mapped, check_unmapped, marked_region, show};
use crate::framework::runner::{Context, TestOutcome, failed};
use crate::mm::pte;
use crate::mm::region::{Map, TABLE_PAGES};

/// `move_ptes()`: per page, read the old entry, clear it and `set_ptes(…, 1)` the destination,
/// all in one section; the destination straddles an L1 boundary. With `lazy=strict` the nested
/// enter is a BUG.
pub fn move_ptes(ctx: &Context) -> TestOutcome {
    const N: u64 = 64;
    let dst = 4 * TABLE_PAGES - N / 2;
    let r = marked_region(dst + N, N)?;
    let section = pte::LazySection::enter().map_err(failed)?;
    for i in 0..N {
        r.set_pte(i, Map::Frame(i)).map_err(failed)?;
    }
    section.leave().map_err(failed)?;
    for i in 0..N {
        check_mapped(&r, i, i)?;
    }
    if ctx.options.strict_lazy {
        println!("    lazy=strict: the nested enter in set_ptes() must hit BUG");
    }
    let (raw0, c0) = (issued(), pte::counters());
    pte::enter().map_err(failed)?;
    for i in 0..N {
        let old = r.read_pte(i).map_err(failed)?;
        let map = r
            .map_of(old)
            .ok_or_else(|| failed(format_args!("page {i} maps {old}, no frame of the region")))?;
        r.set_pte(i, Map::None).map_err(failed)?;
        r.set_ptes(dst + i, 1, map).map_err(failed)?;
        ensure!(pte::is_active(), "nested leave ended lazy mode at page {i}");
    }
    pte::flush_tlb_local().map_err(failed)?;
    pte::leave().map_err(failed)?;
    let d = pte::counters().since(&c0);
    println!(
        "    moved {N} pages to page {dst} (across an L1 boundary), {} raw hypercalls",
        issued() - raw0
    );
    show("counters", &d);
    ensure_eq!(
        d.flushes_for(FlushReason::NestedLeave),
        N,
        "nested leaves flush"
    );
    ensure_eq!(
        d.flushes_for(FlushReason::Leave),
        1,
        "outermost leave flushes"
    );
    ensure_eq!(d.rejected, 0, "rejected requests");
    for i in 0..N {
        check_mapped(&r, dst + i, i)?;
        check_unmapped(&r, i)?;
    }
    Ok(())
}

/// Sections nested 8 deep, writes at every level on the way in and out: every leave flushes
/// exactly what is queued, and only the outermost ends lazy mode.
pub fn nested_sections(_: &Context) -> TestOutcome {
    const DEPTH: u64 = 8;
    const PER_LEVEL: u64 = 16;
    let n = DEPTH * PER_LEVEL * 2;
    let r = marked_region(n, n)?;
    let c0 = pte::counters();
    let mut slot = 0;
    for _ in 0..DEPTH {
        pte::enter().map_err(failed)?;
        for _ in 0..PER_LEVEL {
            r.set_pte(slot, Map::Frame(slot)).map_err(failed)?;
            slot += 1;
        }
    }
    ensure_eq!(pte::depth(), DEPTH as u32, "depth");
    for level in (1..=DEPTH).rev() {
        let raw0 = issued();
        pte::leave().map_err(failed)?;
        ensure_eq!(
            issued() - raw0,
            1,
            "hypercalls for the leave at depth {level}"
        );
        ensure_eq!(
            pte::is_active(),
            level > 1,
            "active after leaving depth {level}"
        );
        for s in 0..slot {
            ensure_eq!(
                r.live_pte(s).map_err(failed)?.mfn(),
                r.frame_mfn(s).map_err(failed)?,
                "slot {s} after leaving depth {level}"
            );
        }
        if level > 1 {
            for _ in 0..PER_LEVEL {
                r.set_pte(slot, Map::Frame(slot)).map_err(failed)?;
                slot += 1;
            }
            let last = r.live_pte(slot - 1).map_err(failed)?;
            ensure!(
                !last.is_present(),
                "write at depth {} already issued: {last}",
                level - 1
            );
        }
    }
    let d = pte::counters().since(&c0);
    show("counters", &d);
    ensure_eq!(
        d.flushes_for(FlushReason::NestedLeave),
        DEPTH - 1,
        "nested-leave flushes"
    );
    ensure_eq!(d.flushes_for(FlushReason::Leave), 1, "leave flushes");
    for s in 0..slot {
        check_mapped(&r, s, s)?;
    }
    Ok(())
}

/// Deliberate crash: the kernel API treats an unbalanced leave as a BUG (run by name only).
pub fn bug_unbalanced_leave(_: &Context) -> TestOutcome {
    let _ = pte::leave();
    Err(failed("an unbalanced leave did not stop the kernel"))
}
