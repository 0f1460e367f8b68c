//! `set_ptes()`'s contract and frames: consecutive frames for `nr > 1`, a broken contract or a
//! count that would overflow refused before anything is queued, frames that are not the
//! domain's refused (not a #PF).

use hypercalls::calls::issued;
use hypercalls::{Mfn, Pfn, Pte};
use lazy_mmu::{MmuError, SetPtesRule, check_set_ptes};

use super::util::{check_mapped, marked_region};
use crate::framework::runner::{Context, TestOutcome, failed};
use crate::mm::MmError;
use crate::mm::pte::{self, KERNEL_RW};
use crate::mm::region::{Map, TABLE_PAGES};
use crate::xen::{self, p2m};

fn rule(e: Result<(), MmError>) -> Option<SetPtesRule> {
    match e {
        Err(MmError::Mmu(MmuError::SetPtes(r))) => Some(r),
        _ => None,
    }
}

/// `set_ptes(nr = 16)` maps page `i` to frame `first + i`: every entry read back.
pub fn set_ptes_consecutive(_: &Context) -> TestOutcome {
    const N: u64 = 16;
    let r = marked_region(N, N + 3)?;
    r.set_ptes(0, N, Map::Frame(3)).map_err(failed)?;
    for i in 0..N {
        let e = r.read_pte(i).map_err(failed)?;
        ensure_eq!(r.map_of(e), Some(Map::Frame(3 + i)), "entry {i} ({e})");
        check_mapped(&r, i, 3 + i)?;
    }
    Ok(())
}

/// Broken contracts are refused before anything is queued, and what was queued survives: a
/// zero count, a range crossing the L1 table, a count near 2^64 (which must not wrap), and
/// frames beyond the domain. Unaligned addresses and a `ptep` that is not the address's entry
/// cannot be expressed through a region; the core's check refuses them.
pub fn api_misuse(_: &Context) -> TestOutcome {
    let r = marked_region(TABLE_PAGES, 4)?;
    pte::enter().map_err(failed)?;
    for i in 0..3 {
        r.set_pte(i, Map::Frame(i)).map_err(failed)?;
    }
    let queued = pte::queued();
    let raw0 = issued();
    let huge = u64::MAX - 100;
    let cases = [
        (r.set_ptes(0, 0, Map::Frame(0)), SetPtesRule::ZeroCount),
        (
            r.set_ptes(511, 2, Map::Frame(0)),
            SetPtesRule::CrossesTable {
                first_index: 511,
                nr: 2,
            },
        ),
        (
            r.set_ptes(200, huge, Map::None),
            SetPtesRule::CrossesTable {
                first_index: 200,
                nr: huge,
            },
        ),
        (
            r.set_ptes(200, huge, Map::Frame(0)),
            SetPtesRule::CrossesTable {
                first_index: 200,
                nr: huge,
            },
        ),
    ];
    let va = r.va(8).map_err(failed)?;
    let ptep = r.ptep(8).map_err(failed)?;
    let core_cases = [
        (
            check_set_ptes(va + 8u64, ptep, 1),
            SetPtesRule::UnalignedAddress {
                addr: va.as_u64() + 8,
            },
        ),
        (
            check_set_ptes(va, r.ptep(9).map_err(failed)?, 1),
            SetPtesRule::PtepMismatch {
                addr_index: 8,
                ptep_index: 9,
            },
        ),
    ];
    // Counted before printing: console output is a hypercall too.
    let raw = issued() - raw0;
    ensure_eq!(pte::queued(), queued, "queue after refused calls");
    for (result, want) in cases {
        ensure_eq!(rule(result), Some(want), "set_ptes misuse");
        println!("    refused: {want}");
    }
    for (result, want) in core_cases {
        ensure_eq!(result, Err(want), "set_ptes contract");
        println!("    refused: {want}");
    }
    ensure_eq!(raw, 0, "hypercalls caused by refused calls");
    ensure_eq!(pte::depth(), 1, "depth kept");
    pte::leave().map_err(failed)?;
    for i in 0..3 {
        check_mapped(&r, i, i)?;
    }
    Ok(())
}

/// Frames that are not the domain's have no translation and are refused by `set_ptes`'s
/// frame check (the one `mm::pte::set_ptes` runs before queuing), without a fault or a
/// hypercall; frames running past the domain's end are refused too.
pub fn set_ptes_bad_frame(_: &Context) -> TestOutcome {
    let nr_pages = xen::boot_info().nr_pages;
    ensure_eq!(
        p2m::mfn_to_pfn(Mfn::new(p2m::m2p_entries()).ok_or_else(|| failed("M2P size"))?),
        None,
        "M2P one past the table"
    );
    ensure_eq!(
        Mfn::new(u64::MAX >> 12),
        None,
        "a frame beyond 52-bit addresses"
    );
    ensure_eq!(
        p2m::pfn_to_mfn(Pfn::new(nr_pages)),
        None,
        "P2M one past nr_pages"
    );
    ensure_eq!(p2m::pfn_to_mfn(Pfn::new(u64::MAX)), None, "P2M far beyond");
    let raw0 = issued();
    let mut results = alloc::vec::Vec::new();
    for mfn in super::frames::foreign_mfns() {
        let bogus = Pte::new(mfn, KERNEL_RW);
        for nr in [1, 512] {
            results.push((bogus, nr, pte::check_frames(bogus, nr)));
        }
    }
    // The exact value from the bug report.
    let report = Pte::from_raw(0xf_ffff_ffff_f003);
    results.push((report, 1, pte::check_frames(report, 1)));
    let last_pfn = Pfn::new(nr_pages - 1);
    let last = Pte::new(
        p2m::pfn_to_mfn(last_pfn).ok_or_else(|| failed("no P2M entry"))?,
        KERNEL_RW,
    );
    let beyond = pte::check_frames(last, 2);
    ensure_eq!(issued() - raw0, 0, "hypercalls for refused frames");
    for (bogus, nr, result) in results {
        ensure_eq!(
            result,
            Err(SetPtesRule::ForeignFrame { raw: bogus.raw() }),
            "set_ptes of {bogus} x{nr}"
        );
    }
    ensure_eq!(
        beyond,
        Err(SetPtesRule::FramesBeyondDomain {
            first_pfn: last_pfn,
            nr: 2,
            nr_pages
        }),
        "frames past the domain"
    );
    ensure!(pte::check_frames(last, 1).is_ok(), "the last frame refused");
    println!(
        "    refused: {}",
        SetPtesRule::ForeignFrame { raw: report.raw() }
    );
    Ok(())
}
