//! The safe API holds up against misuse: every frame of the image can be read as a table entry,
//! a closure may read while `set_each` runs, dropping a region keeps a section's refusals and
//! ignores old ones, a section guard refuses to leave while paused, sizes and indices out of
//! range are errors (not clamps, panics or the whole domain mapped), and a spare slot is
//! hooked at most once.

use alloc::vec;

use hypercalls::{Pfn, Pte};
use lazy_mmu::MmuError;
use lazy_mmu::program::Op;

use crate::framework::runner::{Context, TestOutcome, failed};
use crate::mm::batches::LinuxBatch;
use crate::mm::peek;
use crate::mm::programs::{self, BatchSize};
use crate::mm::pte::{self, LazySection};
use crate::mm::region::{Map, Region};
use crate::xen::{boot_info, p2m};

/// Every frame below the first free one (the image, start_info, the boot tables) reads as a
/// table entry through `live_pte` and `ptep_get`, also after a `peek` (whose window is no
/// page of the image's linear map) and for the pages Xen shares with us.
pub fn image_frames(_: &Context) -> TestOutcome {
    let l4 = crate::mm::l4_mfn().addr();
    let top = peek(l4).map_err(failed)?;
    ensure_eq!(
        pte::live_pte(l4).map_err(failed)?,
        top,
        "L4 entry 0, peek vs live_pte"
    );
    for pfn in 0..boot_info().first_free_pfn {
        let mfn = p2m::pfn_to_mfn(Pfn::new(pfn)).ok_or_else(|| failed("pfn without mfn"))?;
        for word in [0u64, 511] {
            let at = mfn.entry(word).ok_or_else(|| failed("entry index"))?;
            let live = pte::live_pte(at).map_err(failed)?;
            let got = pte::ptep_get(at).map_err(failed)?;
            let direct = peek(at).map_err(failed)?;
            // Other image pages may change between the reads (counters, locks); the pages
            // whose mapping moved must read as their own frame, not what the slot shows.
            let va = crate::xen::start_info::VIRT_BASE + pfn * hypercalls::PAGE_SIZE;
            if crate::xen::shared::is_slot_page(va) {
                ensure_eq!(
                    (live, got),
                    (direct, direct),
                    "slot pfn {pfn:#x} word {word}"
                );
            }
        }
    }
    Ok(())
}

/// `set_each`'s closure may use the read API (it runs outside the per-vCPU lock).
pub fn set_each_reads(_: &Context) -> TestOutcome {
    let r = Region::new(8, 8, 0).map_err(failed)?;
    r.set_each(0, 8, |p| {
        let _ = r.live_pte(0);
        let _ = pte::depth();
        Map::Frame(p)
    })
    .map_err(failed)?;
    for p in 0..8 {
        ensure_eq!(
            r.map_of(r.read_pte(p).map_err(failed)?),
            Some(Map::Frame(p)),
            "page {p}"
        );
    }
    Ok(())
}

fn refused_count(r: Result<(), MmuError>) -> u32 {
    match r {
        Err(MmuError::Refused(f)) => f.count,
        _ => 0,
    }
}

/// A region dropped inside a section leaves the section's refusal for its leave.
pub fn region_drop_in_section(_: &Context) -> TestOutcome {
    let a = Region::new(1, 1, 0).map_err(failed)?;
    pte::enter().map_err(failed)?;
    a.set_pte(0, Map::TableWritable(0)).map_err(failed)?;
    let b = Region::new(1, 1, 0);
    drop(b);
    let left = pte::leave();
    ensure_eq!(
        refused_count(left),
        1,
        "refusals reported by the leave ({left:?})"
    );
    Ok(())
}

/// A refusal still pending from an earlier section (dropped without `leave`) neither fails a
/// later region's teardown nor is consumed by it.
pub fn old_refusal_teardown(_: &Context) -> TestOutcome {
    let a = Region::new(1, 1, 0).map_err(failed)?;
    {
        let _s = LazySection::enter().map_err(failed)?;
        a.set_pte(0, Map::TableWritable(0)).map_err(failed)?;
    }
    let before = crate::mm::stats().allocated;
    let b = Region::new(2, 2, 1).map_err(failed)?;
    b.set_pte(1, Map::Frame(1)).map_err(failed)?;
    drop(b);
    ensure_eq!(
        crate::mm::stats().allocated,
        before,
        "frames allocated after the region's teardown (a leak if more)"
    );
    let flushed = pte::flush();
    ensure_eq!(
        refused_count(flushed),
        1,
        "the old refusal, reported by flush ({flushed:?})"
    );
    Ok(())
}

/// `LazySection::leave` while a pause taken inside it is in force is an error, not a silent
/// no-op that leaves the section open.
pub fn section_leave_paused(_: &Context) -> TestOutcome {
    let s = LazySection::enter().map_err(failed)?;
    pte::pause().map_err(failed)?;
    let r = s.leave();
    pte::resume();
    let depth = pte::depth();
    if depth > 0 {
        pte::leave().map_err(failed)?;
    }
    ensure_eq!(
        r,
        Err(MmuError::LeaveWhilePaused { pause: 1 }),
        "leave while paused"
    );
    Ok(())
}

/// Sizes beyond what a region may hold are errors before anything is taken or mapped.
pub fn region_limits(_: &Context) -> TestOutcome {
    let before = crate::mm::stats();
    for (frames, spares) in [(u64::MAX, 0), (996_307, 0), (1, u64::MAX), (1, 996_307)] {
        let r = Region::new(1, frames, spares);
        ensure!(r.is_err(), "Region::new(1, {frames}, {spares}) succeeded");
    }
    ensure!(
        Region::new_mapped_lazily(1, u64::MAX).is_err(),
        "new_mapped_lazily(1, u64::MAX) succeeded"
    );
    let after = crate::mm::stats();
    ensure_eq!(after.allocated, before.allocated, "frames allocated");
    ensure!(
        after.mapped_end_pfn <= before.mapped_end_pfn + 1024,
        "direct map grew from pfn {:#x} to {:#x}",
        before.mapped_end_pfn,
        after.mapped_end_pfn
    );
    Ok(())
}

/// Out-of-range pages, words and blocks are errors, not clamped.
pub fn region_indices(_: &Context) -> TestOutcome {
    let mut r = Region::new(2, 2, 1).map_err(failed)?;
    r.set_pte(1, Map::Frame(1)).map_err(failed)?;
    ensure!(r.probe(1, 0).is_ok(), "page 1 probes");
    ensure!(r.probe(2, 0).is_err(), "page 2 of 2 probed");
    ensure!(r.probe(1, 512).is_err(), "word 512 probed");
    r.hook_spare(0, 300).map_err(failed)?;
    ensure!(r.block_entry(300).is_ok(), "block 300");
    ensure!(r.block_entry(300 + 512).is_err(), "block 812 accepted");
    // A second hook of the same block is refused, and the first stays.
    ensure!(
        r.hook_spare(0, 300).is_err(),
        "a second hook of block 300 accepted"
    );
    Ok(())
}

/// A program or a batch beyond the region is refused before anything is queued.
pub fn program_bounds(_: &Context) -> TestOutcome {
    let r = Region::new(4, 2, 0).map_err(failed)?;
    for op in [
        Op::SetPte { slot: 4, frame: 0 },
        Op::SetPte { slot: 0, frame: 2 },
        Op::SetPtes {
            slot: 2,
            nr: 3,
            frame: 0,
        },
        Op::Clear { slot: 99 },
    ] {
        let ops = vec![Op::Enter, Op::SetPte { slot: 0, frame: 0 }, op, Op::Leave];
        ensure!(
            programs::run(&r, &ops, BatchSize::PerCpu).is_err(),
            "program with {op:?} accepted"
        );
        ensure_eq!(pte::depth(), 0, "depth after the refused program");
        ensure_eq!(
            r.live_pte(0).map_err(failed)?,
            Pte::NONE,
            "page 0 after {op:?}"
        );
    }
    let mut b = LinuxBatch::new();
    ensure!(b.map_pages(&r, 5, Map::Frame).is_err(), "map_pages(5) of 4");
    ensure_eq!(b.counters().hypercalls, 0, "hypercalls of the refused map");
    ensure_eq!(
        r.live_pte(0).map_err(failed)?,
        Pte::NONE,
        "page 0 after map_pages"
    );
    ensure!(b.unmap_pages(&r, 5).is_err(), "unmap_pages(5) of 4");
    ensure_eq!(
        b.counters().hypercalls,
        0,
        "hypercalls of the refused unmap"
    );
    Ok(())
}
