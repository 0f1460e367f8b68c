//! Lazy MMU mode against real Xen: eager and batched writes, the `move_ptes()` scenario that
//! killed Xen PV guests in 2023, buffer overflow, deep nesting, a rejected request in a batch,
//! and API misuse.
//!
//! Hypercalls are observed twice: through the batching's own counters, and through the raw
//! count kept by the `hypercalls` crate at the single entry into Xen.

use alloc::vec::Vec;

use hypercalls::calls::issued;

use crate::mm::frames::{self, Frame};
use crate::mm::lazy::{Counters, FlushReason, Hypervisor, MmuError, SetPtesRule};
use crate::mm::pagetable;
use crate::mm::pte::{self, KERNEL_RW, Pte, PtePtr};
use crate::testing::{Context, TestOutcome, failed};
use crate::traps;
use crate::xen::PAGE_SIZE;
use crate::{ensure, ensure_eq};

/// Each test maps in its own 1 GiB of address space, in an L4 slot of its own.
const TEST_REGION_BASE: u64 = 0xFFFF_CA00_0000_0000;
const L1_SPAN: u64 = 512 * PAGE_SIZE;

pub fn region(n: u64) -> u64 {
    TEST_REGION_BASE + (n << 30)
}

/// A value to fill page `i` of a test with, word `w`.
fn marker(i: u64, w: u64) -> u64 {
    0x5a5a_0000_0000_0000 | (i << 20) | w
}

/// Fresh frames whose linear-map words 0 and 511 carry the page's marker.
fn marked_frames(n: u64) -> Result<Vec<Frame>, crate::testing::TestFail> {
    let mut v = Vec::with_capacity(n as usize);
    for i in 0..n {
        let f = frames::alloc_zeroed().map_err(failed)?;
        // SAFETY: a fresh frame, ours alone, mapped read-write in the linear map.
        unsafe {
            let p = f.va() as *mut u64;
            p.write_volatile(marker(i, 0));
            p.add(511).write_volatile(marker(i, 511));
        }
        v.push(f);
    }
    Ok(v)
}

/// Check that `va` maps frame `i` of a marked set, reading through `va`.
fn check_mapped(va: u64, i: u64) -> TestOutcome {
    let first = traps::try_read_u64(va).map_err(|f| failed(alloc::format!("{va:#x}: {f:?}")))?;
    let last =
        traps::try_read_u64(va + 511 * 8).map_err(|f| failed(alloc::format!("{va:#x}: {f:?}")))?;
    ensure_eq!(
        (first, last),
        (marker(i, 0), marker(i, 511)),
        "contents at {va:#x}"
    );
    Ok(())
}

/// Check that `va` is unmapped: a read faults with a not-present #PF at exactly `va`.
fn check_unmapped(va: u64) -> TestOutcome {
    match traps::try_read_u64(va) {
        Ok(v) => Err(failed(alloc::format!(
            "{va:#x} still mapped (reads {v:#x})"
        ))),
        Err(f) => {
            ensure_eq!(
                (f.vector, f.address, f.error_code & 1),
                (14, va, 0),
                "fault at {va:#x}"
            );
            Ok(())
        }
    }
}

/// The live value of an entry, read without flushing anything.
fn live(ptep: PtePtr) -> Pte {
    pte::with_lazy(|l| Pte(l.hypervisor().read_pte(ptep.0)))
}

/// L1 entry pointers for `n` pages from `va`, creating tables outside any lazy section.
fn l1_entries(va: u64, n: u64) -> Result<Vec<PtePtr>, crate::testing::TestFail> {
    let mut v: Vec<PtePtr> = Vec::with_capacity(n as usize);
    for i in 0..n {
        let page = va + i * PAGE_SIZE;
        let p = match v.last() {
            Some(prev) if !page.is_multiple_of(L1_SPAN) => prev.offset(1),
            _ => pagetable::ensure_l1(page).map_err(failed)?,
        };
        v.push(p);
    }
    Ok(v)
}

/// Unmap `frames` mapped at `va` and give them back.
fn unmap_and_free(va: u64, ptes: &[PtePtr], frames_used: Vec<Frame>) -> TestOutcome {
    let section = pte::LazySection::enter();
    for (i, p) in ptes.iter().enumerate() {
        pte::set_pte(*p, Pte::NONE, va + i as u64 * PAGE_SIZE).map_err(failed)?;
    }
    pte::flush_tlb_local().map_err(failed)?;
    section.leave().map_err(failed)?;
    for f in frames_used {
        frames::free(f);
    }
    Ok(())
}

fn show(label: &str, d: &Counters) {
    print!(
        "    {label}: {} hypercalls ({} multicalls, {} entries), {} requests, {} other ops; flushes:",
        d.hypercalls, d.multicalls, d.multicall_entries, d.requests, d.other_ops
    );
    for r in FlushReason::ALL {
        let n = d.flushes_for(r);
        if n > 0 {
            print!(" {}={n}", r.name());
        }
    }
    println!();
}

/// Test 1: Outside lazy mode one `set_pte` is one `mmu_update`, at once.
pub fn eager_set_pte(_: &Context) -> TestOutcome {
    let va = region(1);
    let ptes = l1_entries(va, 1)?;
    let page = marked_frames(1)?;
    ensure!(!pte::is_active(), "lazy mode active outside any section");
    let (raw0, c0) = (issued(), pte::counters());
    pte::set_pte(ptes[0], Pte::from_mfn(page[0].mfn, KERNEL_RW), va).map_err(failed)?;
    let d = pte::counters().since(&c0);
    ensure_eq!(issued() - raw0, 1, "raw hypercalls for one eager set_pte");
    ensure_eq!(
        (d.hypercalls, d.multicalls, d.requests),
        (1, 0, 1),
        "counters"
    );
    check_mapped(va, 0)?;
    // Write through the new mapping, read back through the linear map: the same frame.
    // SAFETY: `va` maps our fresh frame read-write.
    unsafe { (va as *mut u64).add(7).write_volatile(0xfeed_f00d) };
    // SAFETY: the frame's linear mapping is read-write and ours.
    let back = unsafe { (page[0].va() as *const u64).add(7).read_volatile() };
    ensure_eq!(back, 0xfeed_f00d, "value written through the new mapping");
    unmap_and_free(va, &ptes, page)?;
    check_unmapped(va)
}

/// Test 2: 512 writes in one section: nothing reaches Xen before the leave, one hypercall after.
pub fn lazy_batch(_: &Context) -> TestOutcome {
    const N: u64 = 512;
    let va = region(2);
    let ptes = l1_entries(va, N)?;
    let pages = marked_frames(N)?;
    let (raw0, c0) = (issued(), pte::counters());
    pte::enter();
    ensure!(pte::is_active(), "not active after enter");
    for (i, p) in ptes.iter().enumerate() {
        pte::set_pte(
            *p,
            Pte::from_mfn(pages[i].mfn, KERNEL_RW),
            va + i as u64 * PAGE_SIZE,
        )
        .map_err(failed)?;
    }
    let raw_before_leave = issued() - raw0;
    let (entries, reqs) = pte::with_lazy(|l| (l.queued_entries(), l.queued_requests()));
    pte::leave().map_err(failed)?;
    let raw_after = issued() - raw0;
    let d = pte::counters().since(&c0);
    println!(
        "    {N} set_pte in a lazy section: {raw_before_leave} hypercalls before leave, {raw_after} after"
    );
    println!("    queued before leave: {entries} multicall entry, {reqs} requests");
    show("counters", &d);
    ensure_eq!(raw_before_leave, 0, "hypercalls inside the section");
    ensure_eq!(
        (entries, reqs),
        (1, N as usize),
        "queue: coalesced into one entry"
    );
    // One entry: the plain mmu_update, not a multicall.
    ensure_eq!(raw_after, 1, "hypercalls for the batch");
    ensure_eq!(
        (d.hypercalls, d.multicalls, d.requests),
        (1, 0, N),
        "counters"
    );
    ensure_eq!(d.flushes_for(FlushReason::Leave), 1, "leave flushes");
    ensure!(!pte::is_active(), "still active after the outermost leave");
    for i in 0..N {
        check_mapped(va + i * PAGE_SIZE, i)?;
    }
    unmap_and_free(va, &ptes, pages)
}

/// Tests 3 and 4: The seed scenario: `move_ptes()` runs in a lazy section and, per page, clears the old
/// entry and calls generic `set_ptes(…, 1)`, whose own enter/leave nests inside. With the
/// nesting-aware model the data arrives intact; with `lazy=strict` the nested enter is a BUG.
pub fn move_ptes(ctx: &Context) -> TestOutcome {
    const N: u64 = 64;
    let src = region(3);
    // The destination straddles an L1 boundary: half in one table, half in the next.
    let dst = region(3) + 4 * L1_SPAN - (N / 2) * PAGE_SIZE;
    let src_ptes = l1_entries(src, N)?;
    let dst_ptes = l1_entries(dst, N)?;
    ensure!(
        dst_ptes[0].0 >> 12 != dst_ptes[N as usize - 1].0 >> 12,
        "destination within one L1"
    );
    let pages = marked_frames(N)?;
    let section = pte::LazySection::enter();
    for (i, p) in src_ptes.iter().enumerate() {
        pte::set_pte(
            *p,
            Pte::from_mfn(pages[i].mfn, KERNEL_RW),
            src + i as u64 * PAGE_SIZE,
        )
        .map_err(failed)?;
    }
    section.leave().map_err(failed)?;
    for i in 0..N {
        check_mapped(src + i * PAGE_SIZE, i)?;
    }
    if ctx.options.strict_lazy {
        println!("    lazy=strict: the nested enter in set_ptes() must hit BUG");
    }
    let (raw0, c0) = (issued(), pte::counters());
    pte::enter();
    for i in 0..N {
        let old = pte::ptep_get(src_ptes[i as usize]).map_err(failed)?;
        pte::set_pte(src_ptes[i as usize], Pte::NONE, src + i * PAGE_SIZE).map_err(failed)?;
        pte::set_ptes(dst + i * PAGE_SIZE, dst_ptes[i as usize], old, 1).map_err(failed)?;
        ensure!(pte::is_active(), "nested leave ended lazy mode at page {i}");
    }
    pte::flush_tlb_local().map_err(failed)?;
    pte::leave().map_err(failed)?;
    let d = pte::counters().since(&c0);
    println!(
        "    moved {N} pages {src:#x} -> {dst:#x} (across an L1 boundary), {} raw hypercalls",
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
        check_mapped(dst + i * PAGE_SIZE, i)?;
        check_unmapped(src + i * PAGE_SIZE)?;
    }
    unmap_and_free(dst, &dst_ptes, pages)
}

/// Test 5a: A section with more writes than the buffer holds flushes once when full, mid-section.
pub fn buffer_overflow(_: &Context) -> TestOutcome {
    let capacity = crate::mm::lazy::DEFAULT_REQUESTS as u64;
    let n = capacity + capacity / 2;
    let va = region(5);
    let ptes = l1_entries(va, n)?;
    let pages = marked_frames(n)?;
    let (raw0, c0) = (issued(), pte::counters());
    pte::enter();
    for i in 0..n {
        pte::set_pte(
            ptes[i as usize],
            Pte::from_mfn(pages[i as usize].mfn, KERNEL_RW),
            va + i * PAGE_SIZE,
        )
        .map_err(failed)?;
        let raw = issued() - raw0;
        let expected = if i < capacity { 0 } else { 1 };
        ensure_eq!(raw, expected, "hypercalls after write {}", i + 1);
    }
    // The first `capacity` writes are in effect, the rest still queued.
    ensure_eq!(
        live(ptes[0]).mfn(),
        pages[0].mfn,
        "first write after the full flush"
    );
    ensure_eq!(
        live(ptes[capacity as usize]),
        Pte::NONE,
        "write queued after the full flush"
    );
    pte::leave().map_err(failed)?;
    let raw = issued() - raw0;
    let d = pte::counters().since(&c0);
    show("counters", &d);
    ensure_eq!(raw, 2, "hypercalls in all");
    ensure_eq!(d.flushes_for(FlushReason::Full), 1, "full flushes");
    ensure_eq!(d.flushes_for(FlushReason::Leave), 1, "leave flushes");
    for i in 0..n {
        check_mapped(va + i * PAGE_SIZE, i)?;
    }
    unmap_and_free(va, &ptes, pages)
}

/// Test 5b: Sections nested 8 deep, writes at every level on the way in and out: every leave
/// flushes exactly what is queued, and only the outermost ends lazy mode.
pub fn nested_sections(_: &Context) -> TestOutcome {
    const DEPTH: u64 = 8;
    const PER_LEVEL: u64 = 16;
    let n = DEPTH * PER_LEVEL * 2;
    let va = region(6);
    let ptes = l1_entries(va, n)?;
    let pages = marked_frames(n)?;
    let write = |slot: u64| {
        pte::set_pte(
            ptes[slot as usize],
            Pte::from_mfn(pages[slot as usize].mfn, KERNEL_RW),
            va + slot * PAGE_SIZE,
        )
    };
    let c0 = pte::counters();
    let mut slot = 0;
    for _ in 0..DEPTH {
        pte::enter();
        for _ in 0..PER_LEVEL {
            write(slot).map_err(failed)?;
            slot += 1;
        }
    }
    let depth_reached = pte::with_lazy(|l| l.depth());
    ensure_eq!(depth_reached, DEPTH as u32, "depth");
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
                live(ptes[s as usize]).mfn(),
                pages[s as usize].mfn,
                "slot {s} after leaving depth {level}"
            );
        }
        if level > 1 {
            for _ in 0..PER_LEVEL {
                write(slot).map_err(failed)?;
                slot += 1;
            }
            ensure_eq!(
                live(ptes[slot as usize - 1]),
                Pte::NONE,
                "write at depth {} not yet issued",
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
        check_mapped(va + s * PAGE_SIZE, s)?;
    }
    unmap_and_free(va, &ptes, pages)
}

/// Test 6: One invalid request (a writable mapping of a pinned page table) in the middle of a
/// batch: it is reported precisely, and every other request of the batch is in effect.
pub fn invalid_request(_: &Context) -> TestOutcome {
    const N: u64 = 20;
    const BAD: u64 = 5;
    let va = region(7);
    let ptes = l1_entries(va, N)?;
    let pages = marked_frames(N)?;
    let table_mfn = ptes[0].0 >> 12;
    let bad_pte = Pte::from_mfn(table_mfn, KERNEL_RW);
    pte::enter();
    for i in 0..N {
        let value = if i == BAD {
            bad_pte
        } else {
            Pte::from_mfn(pages[i as usize].mfn, KERNEL_RW)
        };
        pte::set_pte(ptes[i as usize], value, va + i * PAGE_SIZE).map_err(failed)?;
        if i == 9 {
            // A different operation in between: the batch becomes three multicall entries.
            pte::flush_tlb_one(va).map_err(failed)?;
        }
    }
    let entries = pte::with_lazy(|l| l.queued_entries());
    ensure_eq!(entries, 3, "multicall entries queued");
    let result = pte::leave();
    let failure = match result {
        Err(MmuError::Flush(f)) => f,
        other => {
            return Err(failed(alloc::format!(
                "leave returned {other:?}, expected a rejected request"
            )));
        }
    };
    println!("    reported: {failure}");
    let listed: Vec<_> = pte::with_lazy(|l| l.last_rejections().copied().collect());
    ensure_eq!((failure.count, listed.len()), (1, 1), "rejected requests");
    let r = failure.first;
    ensure_eq!(listed[0], r, "listed rejection");
    ensure_eq!(
        (r.entry, r.request),
        (0, BAD as u32),
        "entry and request index"
    );
    ensure_eq!(
        (r.va, r.ptr, r.val),
        (va + BAD * PAGE_SIZE, ptes[BAD as usize].0, bad_pte.0),
        "va, pte maddr, value"
    );
    ensure!(
        matches!(
            r.error,
            hypercalls::XenError::Inval | hypercalls::XenError::Busy
        ),
        "error {}",
        r.error
    );
    ensure!(
        !pte::is_active(),
        "lazy mode still active after the outermost leave"
    );
    for i in 0..N {
        if i == BAD {
            ensure_eq!(live(ptes[i as usize]), Pte::NONE, "the rejected entry");
            check_unmapped(va + i * PAGE_SIZE)?;
        } else {
            check_mapped(va + i * PAGE_SIZE, i)?;
        }
    }
    unmap_and_free(va, &ptes, pages)
}

/// API misuse: a broken `set_ptes()` contract is refused before anything is queued, and what
/// was queued survives; an unbalanced leave is an error of the core (a BUG in the kernel API).
pub fn api_misuse(_: &Context) -> TestOutcome {
    let va = region(8);
    let ptes = l1_entries(va, 4)?;
    let pages = marked_frames(4)?;
    let pte0 = Pte::from_mfn(pages[0].mfn, KERNEL_RW);
    pte::enter();
    for i in 0..3u64 {
        pte::set_pte(
            ptes[i as usize],
            Pte::from_mfn(pages[i as usize].mfn, KERNEL_RW),
            va + i * PAGE_SIZE,
        )
        .map_err(failed)?;
    }
    let raw0 = issued();
    let last = ptes[0].offset(511);
    let nr_pages = crate::xen::boot_info().nr_pages;
    let last_frame =
        Pte::from_pfn(nr_pages - 1, KERNEL_RW).ok_or_else(|| failed("no P2M entry"))?;
    let cases = [
        (pte::set_ptes(va, ptes[0], pte0, 0), SetPtesRule::ZeroCount),
        (
            pte::set_ptes(va + 8, ptes[0], pte0, 1),
            SetPtesRule::UnalignedAddress { addr: va + 8 },
        ),
        (
            pte::set_ptes(va + 511 * PAGE_SIZE, last, pte0, 2),
            SetPtesRule::CrossesTable {
                first_index: 511,
                nr: 2,
            },
        ),
        (
            pte::set_ptes(va, ptes[1], pte0, 1),
            SetPtesRule::PtepMismatch {
                addr_index: 0,
                ptep_index: 1,
            },
        ),
        (
            pte::set_ptes(va, ptes[0], last_frame, 2),
            SetPtesRule::FramesBeyondDomain {
                first_pfn: nr_pages - 1,
                nr: 2,
                nr_pages,
            },
        ),
    ];
    // Counted before printing: console output is a hypercall too.
    let raw = issued() - raw0;
    for (result, rule) in cases {
        ensure_eq!(result, Err(MmuError::SetPtes(rule)), "set_ptes misuse");
        println!("    refused: {rule}");
    }
    ensure_eq!(raw, 0, "hypercalls caused by refused calls");
    ensure_eq!(
        pte::with_lazy(|l| (l.queued_requests(), l.depth())),
        (3, 1),
        "queue and depth kept"
    );
    pte::leave().map_err(failed)?;
    for i in 0..3 {
        check_mapped(va + i * PAGE_SIZE, i)?;
    }
    let unbalanced = pte::with_lazy(|l| l.leave());
    ensure_eq!(
        unbalanced,
        Err(MmuError::UnbalancedLeave),
        "leave without enter"
    );
    println!("    refused: {}", MmuError::UnbalancedLeave);
    unmap_and_free(va, &ptes[..3], pages)
}

/// Deliberate crash: the kernel API treats an unbalanced leave as a BUG (run by name only).
pub fn bug_unbalanced_leave(_: &Context) -> TestOutcome {
    let _ = pte::leave();
    Err(failed("an unbalanced leave did not stop the kernel"))
}
