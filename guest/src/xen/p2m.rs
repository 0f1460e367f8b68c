//! The P2M (pseudo-physical → machine, the domain's own list) and Xen's M2P (machine →
//! pseudo-physical, one table for all domains). Every lookup is bounds-checked: the P2M by
//! `nr_pages`, the M2P by the size Xen reports (`XENMEM_machphys_mapping`), and a hole in the
//! M2P is read through a fault probe.

use core::sync::atomic::{AtomicU64, Ordering};

use hypercalls::abi::MACH2PHYS_VIRT_START;
use hypercalls::{Mfn, Pfn, XenError, calls};

use super::start_info::boot_info;
use crate::arch::probe;

/// Number of entries of Xen's M2P table we may read (`max_mfn + 1`, bounded by the table's
/// virtual size); 0 until [`init_m2p`].
static M2P_ENTRIES: AtomicU64 = AtomicU64::new(0);

/// Ask Xen how large the M2P table is. Until this runs every M2P lookup fails.
pub fn init_m2p() -> Result<u64, XenError> {
    let m = calls::machphys_mapping()?;
    if m.v_start != MACH2PHYS_VIRT_START || m.v_end <= m.v_start {
        return Err(XenError::Inval);
    }
    let entries = m.max_mfn.saturating_add(1).min((m.v_end - m.v_start) / 8);
    M2P_ENTRIES.store(entries, Ordering::Relaxed);
    Ok(entries)
}

/// Number of machine frames the M2P table covers (0 before [`init_m2p`]).
pub fn m2p_entries() -> u64 {
    M2P_ENTRIES.load(Ordering::Relaxed)
}

/// Machine frame of pseudo-physical frame `pfn`; `None` beyond the domain (or a P2M entry that
/// is no machine frame).
pub fn pfn_to_mfn(pfn: Pfn) -> Option<Mfn> {
    let info = boot_info();
    if pfn.get() >= info.nr_pages {
        return None;
    }
    // SAFETY: `mfn_list` holds `nr_pages` entries inside the boot mapping (validated), and
    // `pfn < nr_pages`.
    let raw = unsafe { core::ptr::read((info.mfn_list as *const u64).add(pfn.get() as usize)) };
    Mfn::new(raw)
}

/// What Xen's M2P table says for machine frame `mfn`: `None` if the frame lies beyond the table
/// or its entry is not mapped (a hole in machine memory). The value may be Xen's
/// `INVALID_M2P_ENTRY` or another domain's frame number: see [`owned_pfn`].
pub fn mfn_to_pfn(mfn: Mfn) -> Option<Pfn> {
    if mfn.get() >= m2p_entries() {
        return None;
    }
    // In bounds (mfn < 2^40), so the address does not overflow; Xen may leave the part of the
    // table for a hole in machine memory unmapped, so read through the fault probe.
    probe::try_read_u64(MACH2PHYS_VIRT_START + mfn.get() * 8)
        .ok()
        .map(Pfn::new)
}

/// Pseudo-physical frame of machine frame `mfn` if it is one of this domain's frames (its M2P
/// entry is a frame of ours whose P2M entry is `mfn` again), else `None`.
pub fn owned_pfn(mfn: Mfn) -> Option<Pfn> {
    let pfn = mfn_to_pfn(mfn)?;
    (pfn_to_mfn(pfn)? == mfn).then_some(pfn)
}

/// Try to write the first entry of the M2P table, which Xen maps read-only into every PV guest:
/// the write always faults (a protection #PF), and the fault is returned.
pub fn probe_m2p_write() -> Result<(), probe::Fault> {
    // SAFETY: Xen maps the M2P read-only in every PV guest, so the write cannot succeed and
    // nothing changes; the probe turns the #PF into an Err.
    unsafe { probe::try_write_u64(MACH2PHYS_VIRT_START, 0) }
}
