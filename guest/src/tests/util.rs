//! Helpers shared by the tests: marked frames, mapping checks, counter printing.

use alloc::format;

use lazy_mmu::{Counters, FlushReason};

use crate::framework::runner::{TestFail, TestOutcome, failed};
use crate::mm::region::{ProbeError, Region};

/// The value word `w` of data frame `k` is marked with.
pub fn marker(k: u64, w: u64) -> u64 {
    0x5a5a_0000_0000_0000 | (k << 20) | w
}

/// A region of `pages` pages and `frames` data frames, words 0 and 511 of each frame marked.
pub fn marked_region(pages: u64, frames: u64) -> Result<Region, TestFail> {
    let r = Region::new(pages, frames, 0).map_err(failed)?;
    for k in 0..frames {
        r.write(k, 0, marker(k, 0)).map_err(failed)?;
        r.write(k, 511, marker(k, 511)).map_err(failed)?;
    }
    Ok(r)
}

/// Page `page` maps data frame `k`: reading through the region's addresses finds its markers.
pub fn check_mapped(r: &Region, page: u64, k: u64) -> TestOutcome {
    let read = |w| {
        r.probe(page, w)
            .map_err(|f| failed(format!("page {page}: {f:?}")))
    };
    ensure_eq!(
        (read(0)?, read(511)?),
        (marker(k, 0), marker(k, 511)),
        "contents of page {page}"
    );
    Ok(())
}

/// Page `page` is unmapped: a read faults with a not-present #PF at exactly its address.
pub fn check_unmapped(r: &Region, page: u64) -> TestOutcome {
    let va = r.va(page).map_err(failed)?.as_u64();
    match r.probe(page, 0) {
        Ok(v) => Err(failed(format!("page {page} still mapped (reads {v:#x})"))),
        Err(ProbeError::Range(e)) => Err(failed(format!("page {page}: {e}"))),
        Err(ProbeError::Fault(f)) => {
            ensure_eq!(
                (f.vector, f.address, f.error_code & 1),
                (14, va, 0),
                "fault at page {page}"
            );
            Ok(())
        }
    }
}

pub fn show(label: &str, d: &Counters) {
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
