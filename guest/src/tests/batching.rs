//! Batching against real Xen: 512 writes in a section reach Xen as one hypercall at the leave;
//! a section larger than the buffer flushes once when it is full.
//!
//! Hypercalls are observed twice: through the batching's own counters, and through the raw
//! count kept by the `hypercalls` crate at the single entry into Xen.

use hypercalls::calls::issued;
use lazy_mmu::{DEFAULT_REQUESTS, FlushReason};

use super::util::{check_mapped, marked_region, show};
use crate::framework::runner::{Context, TestOutcome, failed};
use crate::mm::pte;
use crate::mm::region::Map;

pub fn lazy_batch(_: &Context) -> TestOutcome {
    const N: u64 = 512;
    let r = marked_region(N, N)?;
    let (raw0, c0) = (issued(), pte::counters());
    pte::enter().map_err(failed)?;
    ensure!(pte::is_active(), "not active after enter");
    for i in 0..N {
        r.set_pte(i, Map::Frame(i)).map_err(failed)?;
    }
    let raw_before_leave = issued() - raw0;
    let (entries, reqs) = pte::queued();
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
        check_mapped(&r, i, i)?;
    }
    Ok(())
}

pub fn buffer_overflow(_: &Context) -> TestOutcome {
    let capacity = DEFAULT_REQUESTS as u64;
    let n = capacity + capacity / 2;
    let r = marked_region(n, n)?;
    let (raw0, c0) = (issued(), pte::counters());
    pte::enter().map_err(failed)?;
    for i in 0..n {
        r.set_pte(i, Map::Frame(i)).map_err(failed)?;
        let raw = issued() - raw0;
        let expected = if i < capacity { 0 } else { 1 };
        ensure_eq!(raw, expected, "hypercalls after write {}", i + 1);
    }
    // The first `capacity` writes are in effect, the rest still queued.
    let first = r.live_pte(0).map_err(failed)?;
    ensure_eq!(
        first.mfn(),
        r.frame_mfn(0).map_err(failed)?,
        "first write after the full flush"
    );
    let queued = r.live_pte(capacity).map_err(failed)?;
    ensure!(
        !queued.is_present(),
        "write queued after the full flush is live: {queued}"
    );
    pte::leave().map_err(failed)?;
    let raw = issued() - raw0;
    let d = pte::counters().since(&c0);
    show("counters", &d);
    ensure_eq!(raw, 2, "hypercalls in all");
    ensure_eq!(d.flushes_for(FlushReason::Full), 1, "full flushes");
    ensure_eq!(d.flushes_for(FlushReason::Leave), 1, "leave flushes");
    for i in 0..n {
        check_mapped(&r, i, i)?;
    }
    Ok(())
}
