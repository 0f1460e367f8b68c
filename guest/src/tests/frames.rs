//! Frame numbers at the edges of the domain and beyond: reading any of the domain's frames as
//! page-table entries, and refusing (not faulting on) machine frames that are not the domain's.

use hypercalls::calls::issued;

use crate::mm::MmError;
use crate::mm::frames;
use crate::mm::lazy::{MmuError, SetPtesRule};
use crate::mm::pagetable;
use crate::mm::pte::{self, KERNEL_RW, Pte, PtePtr};
use crate::mm::xen_hv;
use crate::testing::{Context, TestOutcome, failed};
use crate::xen::{self, INVALID_PFN};
use crate::{ensure, ensure_eq};

/// A machine frame Xen's M2P covers that is not the domain's (Xen's own, or another domain's),
/// if one is found among the first frames.
fn foreign_mfn() -> Option<u64> {
    (0..xen::m2p_entries().min(1 << 16)).find(|&mfn| xen::owned_pfn(mfn).is_none())
}

/// Machine addresses that are in no frame of the domain.
fn foreign_maddrs() -> alloc::vec::Vec<u64> {
    let mut v = alloc::vec![
        xen::m2p_entries() << 12, // the first frame beyond the M2P table
        0x000f_ffff_ffff_f000,    // the largest frame a PTE can name
        !0xfff,                   // beyond any frame number
    ];
    v.extend(foreign_mfn().map(|mfn| mfn << 12));
    v
}

pub fn ptep_get_any_frame(_: &Context) -> TestOutcome {
    let info = xen::boot_info();
    let nr_pages = info.nr_pages;
    let mfn_of =
        |pfn| xen::pfn_to_mfn(pfn).ok_or_else(|| failed(format_args!("no P2M entry for {pfn:#x}")));
    // The last frame (beyond anything mapped unless the domain is tiny), and frames spread over
    // the whole domain, each read twice: through ptep_get and through the peek window.
    let samples = 64u64;
    for k in 0..=samples {
        let pfn = if k == samples {
            nr_pages - 1
        } else {
            k * (nr_pages / samples)
        };
        let ptr = PtePtr((mfn_of(pfn)? << 12) + 8 * (k % 512));
        let got = pte::ptep_get(ptr).map_err(failed)?;
        let peeked = xen_hv::peek(ptr.0).map_err(failed)?;
        ensure_eq!(
            got.0,
            peeked,
            "entry {:#x} (pfn {pfn:#x}) via ptep_get and the window",
            ptr.0
        );
    }
    // The L4 Xen booted us on, entry by entry: ptep_get, the window and the boot mapping agree.
    let l4_mfn = pagetable::l4_mfn();
    for i in [0u64, 255, 273, 511] {
        let direct = crate::traps::try_read_u64(info.pt_base + 8 * i)
            .map_err(|f| failed(format_args!("{f:?}")))?;
        let ptr = PtePtr((l4_mfn << 12) + 8 * i);
        ensure_eq!(
            pte::ptep_get(ptr).map_err(failed)?.0,
            direct,
            "L4 entry {i} via ptep_get"
        );
        ensure_eq!(
            xen_hv::peek(ptr.0).map_err(failed)?,
            direct,
            "L4 entry {i} via the window"
        );
    }
    // A frame of the direct map with known contents.
    let f = frames::alloc_zeroed().map_err(failed)?;
    // SAFETY: the frame is ours alone and mapped read-write at `f.va()`.
    unsafe { ((f.va() + 40) as *mut u64).write_volatile(0x5eed_f00d) };
    let got = pte::ptep_get(PtePtr((f.mfn << 12) + 40)).map_err(failed)?;
    frames::free(f);
    ensure_eq!(got.0, 0x5eed_f00d, "word 5 of a fresh frame");
    // Not the domain's: an error, no fault, and no hypercall.
    let raw0 = issued();
    for maddr in foreign_maddrs() {
        let r = pte::ptep_get(PtePtr(maddr));
        ensure_eq!(
            r,
            Err(MmError::ForeignFrame { maddr }),
            "ptep_get({maddr:#x})"
        );
        ensure!(
            xen_hv::peek(maddr).is_err(),
            "peek({maddr:#x}) read a frame that is not ours"
        );
    }
    ensure_eq!(issued() - raw0, 0, "hypercalls for refused reads");
    let refused: alloc::vec::Vec<alloc::string::String> = foreign_maddrs()
        .iter()
        .map(|m| alloc::format!("{m:#x}"))
        .collect();
    println!(
        "    read {} frames up to pfn {:#x}; refused {} (M2P {} entries)",
        samples + 1,
        nr_pages - 1,
        refused.join(" "),
        xen::m2p_entries()
    );
    Ok(())
}

pub fn set_ptes_bad_frame(_: &Context) -> TestOutcome {
    let nr_pages = xen::boot_info().nr_pages;
    let va = super::lazy_mmu::region(10);
    let ptep = pagetable::ensure_l1(va).map_err(failed)?;
    // Frame numbers that are not the domain's: no translation, no fault.
    ensure_eq!(
        xen::mfn_to_pfn(u64::MAX >> 12),
        None,
        "M2P beyond the table"
    );
    ensure_eq!(
        xen::mfn_to_pfn(xen::m2p_entries()),
        None,
        "M2P one past the table"
    );
    ensure_eq!(xen::pfn_to_mfn(nr_pages), None, "P2M one past nr_pages");
    ensure_eq!(xen::pfn_to_mfn(u64::MAX), None, "P2M far beyond");
    ensure_eq!(
        Pte::from_pfn(nr_pages, KERNEL_RW),
        None,
        "Pte::from_pfn beyond the domain"
    );
    let last = Pte::from_pfn(nr_pages - 1, KERNEL_RW).ok_or_else(|| failed("no P2M entry"))?;
    ensure_eq!(last.next_pfn(1), None, "next_pfn past the last frame");
    ensure_eq!(last.next_pfn(u64::MAX), None, "next_pfn overflowing");
    let raw0 = issued();
    for maddr in foreign_maddrs() {
        let bogus = Pte((maddr & 0x000f_ffff_ffff_f000) | KERNEL_RW.bits());
        ensure_eq!(bogus.pfn(), None, "pfn of {bogus:?}");
        for nr in [1, 512] {
            let r = pte::set_ptes(va, ptep, bogus, nr);
            let rule = SetPtesRule::FramesBeyondDomain {
                first_pfn: INVALID_PFN,
                nr,
                nr_pages,
            };
            ensure_eq!(
                r,
                Err(MmuError::SetPtes(rule)),
                "set_ptes of {bogus:?} x{nr}"
            );
        }
    }
    ensure_eq!(issued() - raw0, 0, "hypercalls for refused set_ptes");
    ensure_eq!(
        pte::ptep_get(ptep).map_err(failed)?,
        Pte::NONE,
        "entry left untouched"
    );
    // The exact value from the bug report.
    let r = pte::set_ptes(va, ptep, Pte(0xf_ffff_ffff_f003), 1);
    println!(
        "    refused: {}",
        r.err().map(|e| alloc::format!("{e}")).unwrap_or_default()
    );
    ensure!(r.is_err(), "Pte(0xfffffffffff003) was accepted");
    Ok(())
}
