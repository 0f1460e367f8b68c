//! Requests Xen refuses: each is reported exactly, naming the request, by the call that ends
//! the batching, and every other request takes effect as if issued one at a time in order.

use alloc::vec::Vec;

use hypercalls::XenError;
use lazy_mmu::{MmuError, Refusal, Refusals, Request};

use super::util::{check_mapped, check_unmapped, marked_region};
use crate::framework::runner::{Context, TestFail, TestOutcome, failed};
use crate::mm::MmError;
use crate::mm::pte;
use crate::mm::region::{Map, Region};

fn refused(result: Result<(), MmError>, what: &str) -> Result<Refusals, TestFail> {
    match result {
        Err(MmError::Mmu(MmuError::Refused(r))) => {
            println!("    {what}: {r}");
            Ok(r)
        }
        other => Err(failed(format_args!(
            "{what} returned {other:?}, expected refused requests"
        ))),
    }
}

/// The leaf write of `map` to `page` as a refusal names it.
fn set_pte_request(r: &Region, page: u64, map: Map) -> Result<Request, TestFail> {
    Ok(Request::SetPte {
        ptr: r.ptep(page).map_err(failed)?,
        val: r.value(map).map_err(failed)?,
        va: r.va(page).map_err(failed)?,
    })
}

/// One invalid request (a writable mapping of a page table) in the middle of a batch of three
/// multicall entries: it is reported precisely, and every other request is in effect.
pub fn invalid_request(_: &Context) -> TestOutcome {
    const N: u64 = 20;
    const BAD: u64 = 5;
    let r = marked_region(N, N)?;
    let bad = Map::TableWritable(0);
    pte::enter().map_err(failed)?;
    for i in 0..N {
        let map = if i == BAD { bad } else { Map::Frame(i) };
        r.set_pte(i, map).map_err(failed)?;
        if i == 9 {
            // A different operation in between: the batch becomes three multicall entries.
            r.invlpg(0).map_err(failed)?;
        }
    }
    ensure_eq!(pte::queued().0, 3, "multicall entries queued");
    let failure = refused(pte::leave().map_err(MmError::Mmu), "leave")?;
    let listed: Vec<Refusal> = pte::last_refusals();
    ensure_eq!((failure.count, listed.len()), (1, 1), "refused requests");
    let first = failure.first;
    ensure_eq!(listed[0], first, "listed refusal");
    ensure_eq!(
        (first.entry, first.index),
        (0, BAD as u32),
        "entry and request index"
    );
    ensure_eq!(
        first.request,
        Some(set_pte_request(&r, BAD, bad)?),
        "the refused request"
    );
    ensure_eq!(first.error, XenError::Busy, "Xen's error");
    ensure!(!pte::is_active(), "still active after the outermost leave");
    for i in 0..N {
        if i == BAD {
            check_unmapped(&r, i)?;
        } else {
            check_mapped(&r, i, i)?;
        }
    }
    Ok(())
}

/// `set_ptes` of [ok, refused, ok] applies entries 0 and 2 and reports the refusal, whether
/// batching is on (its own section) or paused (issued at once).
pub fn paused_set_ptes(_: &Context) -> TestOutcome {
    let r = marked_region(8, 8)?;
    let bad = Map::TableWritable(0);
    for (label, first) in [("unpaused", 0u64), ("paused", 4)] {
        let maps = [Map::Frame(first), bad, Map::Frame(first + 2)];
        let paused = first == 4;
        if paused {
            pte::enter().map_err(failed)?;
            pte::pause().map_err(failed)?;
        }
        let result = r.set_ptes_each(first, &maps);
        if paused {
            pte::resume();
            pte::leave().map_err(failed)?;
        }
        let f = refused(result, label)?;
        ensure_eq!(f.count, 1, "{label}: refusals");
        ensure_eq!(
            f.first.request,
            Some(set_pte_request(&r, first + 1, bad)?),
            "{label}: the refused request"
        );
        check_mapped(&r, first, first)?;
        check_unmapped(&r, first + 1)?;
        check_mapped(&r, first + 2, first + 2)?;
    }
    Ok(())
}

/// The type-order case. Queue: page 0 ← a refused value; page 1 ← spare frame F writable; TLB
/// flush; an L2 entry ← F hooked as an L1 table. In queue order page 1's write succeeds, so the
/// hook is refused (F has a writable mapping): the live tables must say so, and the refusals
/// must name page 0's write and the hook, nothing else.
pub fn type_order(_: &Context) -> TestOutcome {
    const BLOCK: u64 = 300;
    let mut r = Region::new(2, 1, 1).map_err(failed)?;
    let hook_slot = r.block_entry(BLOCK).map_err(failed)?;
    let spare = r.spare_mfn(0).map_err(failed)?;
    pte::enter().map_err(failed)?;
    r.set_pte(0, Map::TableWritable(0)).map_err(failed)?;
    r.set_pte(1, Map::SpareWritable(0)).map_err(failed)?;
    pte::flush_tlb_local().map_err(failed)?;
    r.hook_spare(0, BLOCK).map_err(failed)?;
    let f = refused(pte::leave().map_err(MmError::Mmu), "leave")?;
    let listed: Vec<Refusal> = pte::last_refusals();
    for l in &listed {
        println!("      {l}");
    }
    ensure_eq!((f.count, listed.len()), (2, 2), "refusals");
    ensure_eq!(
        listed[0].request,
        Some(set_pte_request(&r, 0, Map::TableWritable(0))?),
        "first refusal: page 0's write"
    );
    match listed[1].request {
        Some(Request::SetTableEntry { ptr, val }) => {
            ensure_eq!(ptr, hook_slot, "second refusal: the hook's entry");
            ensure_eq!(val.mfn(), spare, "second refusal: the hooked frame");
        }
        other => {
            return Err(failed(format_args!(
                "second refusal is {other:?}, not the hook"
            )));
        }
    }
    let page1 = r.live_pte(1).map_err(failed)?;
    ensure!(
        page1.is_present() && page1.mfn() == spare,
        "page 1 maps {page1}, expected the spare {spare} (its write comes before the hook)"
    );
    let hook = r.live_entry(hook_slot).map_err(failed)?;
    ensure!(!hook.is_present(), "the refused hook is live: {hook}");
    ensure!(
        !r.live_pte(0).map_err(failed)?.is_present(),
        "page 0 mapped"
    );
    Ok(())
}
