//! Reading page-table entries in any frame of the domain, and refusing (not faulting on)
//! machine addresses in frames that are not the domain's.

use alloc::vec::Vec;

use hypercalls::calls::issued;
use hypercalls::{MachAddr, Mfn, Pfn};

use crate::arch::probe;
use crate::framework::runner::{Context, TestOutcome, failed};
use crate::mm::pte;
use crate::mm::region::Region;
use crate::mm::{self, MmError};
use crate::xen::{self, p2m};

/// Machine frames that are not the domain's: the first beyond the M2P table, the largest a PTE
/// can name, and one the M2P covers but gives to someone else (Xen or another domain), if one
/// is found among the first frames.
pub fn foreign_mfns() -> Vec<Mfn> {
    let mut v: Vec<Mfn> = [p2m::m2p_entries(), (1 << 40) - 1]
        .into_iter()
        .filter_map(Mfn::new)
        .collect();
    v.extend(
        (0..p2m::m2p_entries().min(1 << 16))
            .filter_map(Mfn::new)
            .find(|&m| p2m::owned_pfn(m).is_none()),
    );
    v
}

pub fn ptep_get_any_frame(_: &Context) -> TestOutcome {
    let info = xen::boot_info();
    let nr_pages = info.nr_pages;
    let mfn_of = |pfn: u64| {
        p2m::pfn_to_mfn(Pfn::new(pfn))
            .ok_or_else(|| failed(format_args!("no P2M entry for {pfn:#x}")))
    };
    // The last frame (beyond anything mapped unless the domain is tiny), and frames spread over
    // the whole domain, each read twice: through ptep_get and through the peek window.
    let samples = 64u64;
    for k in 0..=samples {
        let pfn = if k == samples {
            nr_pages - 1
        } else {
            k * (nr_pages / samples)
        };
        let ptr = mfn_of(pfn)?.entry(k % 512).ok_or_else(|| failed("entry"))?;
        let got = pte::ptep_get(ptr).map_err(failed)?;
        let peeked = mm::peek(ptr).map_err(failed)?;
        ensure_eq!(
            got,
            peeked,
            "entry {ptr} (pfn {pfn:#x}) via ptep_get and the window"
        );
    }
    // The L4 Xen booted us on, entry by entry: ptep_get, the window and the boot mapping agree.
    let l4 = mm::l4_mfn();
    for i in [0u64, 255, 273, 511] {
        let direct =
            probe::try_read_u64(info.pt_base + 8 * i).map_err(|f| failed(format_args!("{f:?}")))?;
        let ptr = l4.entry(i).ok_or_else(|| failed("entry"))?;
        ensure_eq!(
            pte::ptep_get(ptr).map_err(failed)?.raw(),
            direct,
            "L4 entry {i} via ptep_get"
        );
        ensure_eq!(
            mm::peek(ptr).map_err(failed)?.raw(),
            direct,
            "L4 entry {i} via the window"
        );
    }
    // A frame of the direct map with known contents.
    let r = Region::new(1, 1, 0).map_err(failed)?;
    r.write(0, 5, 0x5eed_f00d).map_err(failed)?;
    let ptr = r
        .frame_mfn(0)
        .map_err(failed)?
        .entry(5)
        .ok_or_else(|| failed("entry"))?;
    ensure_eq!(
        pte::ptep_get(ptr).map_err(failed)?.raw(),
        0x5eed_f00d,
        "word 5 of a fresh frame"
    );
    // Not the domain's: an error, no fault, and no hypercall.
    let raw0 = issued();
    let mut results = Vec::new();
    for mfn in foreign_mfns() {
        let maddr: MachAddr = mfn.addr();
        results.push((maddr, pte::ptep_get(maddr), mm::peek(maddr).is_err()));
    }
    ensure_eq!(issued() - raw0, 0, "hypercalls for refused reads");
    for (maddr, got, peek_refused) in &results {
        ensure_eq!(
            *got,
            Err(MmError::ForeignFrame { maddr: *maddr }),
            "ptep_get({maddr})"
        );
        ensure!(*peek_refused, "peek({maddr}) read a frame that is not ours");
    }
    let refused: Vec<alloc::string::String> = results
        .iter()
        .map(|(m, ..)| alloc::format!("{m}"))
        .collect();
    println!(
        "    read {} frames up to pfn {:#x}; refused {} (M2P {} entries)",
        samples + 1,
        nr_pages - 1,
        refused.join(" "),
        p2m::m2p_entries()
    );
    Ok(())
}
