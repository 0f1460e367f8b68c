//! Walking and growing the live 4-level page tables.
//!
//! Xen PV page tables hold machine frames and are read-only to the guest: we read them through
//! the kernel's mappings of the domain's frames (M2P gives the frame's pseudo-physical number)
//! and change them only with hypercalls. Entries are read with `pte::ptep_get`, so a walk sees writes still queued in a
//! lazy section (the read flushes them first).

use hypercalls::abi::{MMUEXT_PIN_L1_TABLE, MMUEXT_PIN_L2_TABLE, MMUEXT_PIN_L3_TABLE, mmuext_mfn};
use x86_64::structures::paging::PageTableFlags;

use super::MmError;
use super::frames;
use super::pte::{self, KERNEL_RO, Pte, PtePtr};
use crate::xen::{self, VIRT_BASE};

/// Flags of a non-leaf entry (Xen adds USER for a 64-bit PV kernel).
const TABLE_FLAGS: PageTableFlags = PageTableFlags::from_bits_truncate(
    PageTableFlags::PRESENT.bits()
        | PageTableFlags::WRITABLE.bits()
        | PageTableFlags::ACCESSED.bits(),
);

fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & 511
}

/// Machine frame of the L4 Xen booted us on.
pub fn l4_mfn() -> u64 {
    let info = xen::boot_info();
    xen::pfn_to_mfn((info.pt_base - VIRT_BASE) / xen::PAGE_SIZE)
        .expect("pt_base lies in the boot mapping (validated)")
}

fn entry_ptr(table_mfn: u64, idx: u64) -> PtePtr {
    PtePtr((table_mfn << 12) + idx * 8)
}

fn check_va(va: u64) -> Result<(), MmError> {
    let canonical = (va >> 47) == 0 || (va >> 47) == 0x1ffff;
    let l4 = index(va, 4);
    if !canonical || (256..272).contains(&l4) {
        return Err(MmError::ReservedAddress { va });
    }
    Ok(())
}

/// The L1 entry for `va`, if the upper levels exist (`None` if one is missing).
pub fn l1_entry(va: u64) -> Result<Option<PtePtr>, MmError> {
    check_va(va)?;
    let mut table = l4_mfn();
    for level in [4, 3, 2] {
        let e = pte::ptep_get(entry_ptr(table, index(va, level)))?;
        if !e.is_present() {
            return Ok(None);
        }
        if e.flags().contains(PageTableFlags::HUGE_PAGE) {
            return Err(MmError::HugePage { va, level });
        }
        table = e.mfn();
    }
    Ok(Some(entry_ptr(table, index(va, 1))))
}

/// The L1 entry value that maps `va` (`None` if no L1 table covers it).
pub fn lookup(va: u64) -> Result<Option<Pte>, MmError> {
    match l1_entry(va)? {
        Some(p) => Ok(Some(pte::ptep_get(p)?)),
        None => Ok(None),
    }
}

/// The L1 entry for `va`, creating the missing tables: each new table is a zeroed frame, mapped
/// read-only, pinned at its level, then hooked into its parent. In a lazy section these ride in
/// the batch, in that order.
pub fn ensure_l1(va: u64) -> Result<PtePtr, MmError> {
    check_va(va)?;
    let mut table = l4_mfn();
    for level in [4, 3, 2] {
        let slot = entry_ptr(table, index(va, level));
        let e = pte::ptep_get(slot)?;
        if e.is_present() {
            if e.flags().contains(PageTableFlags::HUGE_PAGE) {
                return Err(MmError::HugePage { va, level });
            }
            table = e.mfn();
            continue;
        }
        let frame = frames::alloc_zeroed()?;
        let pin = match level {
            4 => MMUEXT_PIN_L3_TABLE,
            3 => MMUEXT_PIN_L2_TABLE,
            _ => MMUEXT_PIN_L1_TABLE,
        };
        pte::update_va_mapping(frame.va(), Pte::from_mfn(frame.mfn, KERNEL_RO))?;
        pte::mmuext(mmuext_mfn(pin, frame.mfn))?;
        pte::set_pte(slot, Pte::from_mfn(frame.mfn, TABLE_FLAGS), 0)?;
        table = frame.mfn;
    }
    Ok(entry_ptr(table, index(va, 1)))
}

/// Map `pages` fresh zeroed frames read-write at `va` in one lazy section, telling `on_page`
/// which frame backs page `i`.
pub fn map_fresh(
    va: u64,
    pages: u64,
    mut on_page: impl FnMut(u64, frames::Frame),
) -> Result<(), MmError> {
    let section = pte::LazySection::enter();
    let mut l1: Option<PtePtr> = None;
    for i in 0..pages {
        let page_va = va + i * xen::PAGE_SIZE;
        let ptep = match l1 {
            Some(p) if index(page_va, 1) != 0 => p.offset(1),
            _ => ensure_l1(page_va)?,
        };
        l1 = Some(ptep);
        let frame = frames::alloc_zeroed()?;
        pte::set_pte(ptep, Pte::from_mfn(frame.mfn, pte::KERNEL_RW), page_va)?;
        on_page(i, frame);
    }
    section.leave()?;
    Ok(())
}
