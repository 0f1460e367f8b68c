//! Walking and growing the live 4-level page tables.
//!
//! Xen PV page tables hold machine frames and are read-only to the guest: they are read with
//! `pte::ptep_get` (so a walk sees writes still queued in a lazy section: the read flushes them
//! first) and changed only with hypercalls. A new table is a zeroed frame, mapped read-only,
//! pinned at its level, then hooked into its parent; in a lazy section these ride in the batch.

use hypercalls::{MachAddr, Mfn, PAGE_SIZE, Pte};
use lazy_mmu::{TableLevel, TableOp};
use x86_64::VirtAddr;
use x86_64::structures::paging::{PageTableFlags, PageTableIndex};

use super::MmError;
use super::frames::Frame;
use super::pte::{self, KERNEL_RO, KERNEL_RW};
use crate::xen::boot_info;
use crate::xen::p2m;
use crate::xen::start_info::VIRT_BASE;

/// Flags of a non-leaf entry (Xen adds USER for a 64-bit PV kernel).
pub const TABLE_FLAGS: PageTableFlags = PageTableFlags::from_bits_truncate(
    PageTableFlags::PRESENT.bits()
        | PageTableFlags::WRITABLE.bits()
        | PageTableFlags::ACCESSED.bits(),
);

/// Index of `va` in its table at `level` (1..=4).
fn index(va: VirtAddr, level: u8) -> PageTableIndex {
    match level {
        4 => va.p4_index(),
        3 => va.p3_index(),
        2 => va.p2_index(),
        _ => va.p1_index(),
    }
}

fn entry_ptr(table: Mfn, idx: PageTableIndex) -> MachAddr {
    table
        .entry(u64::from(idx))
        .expect("a table index is below 512")
}

/// Machine frame of the L4 Xen booted us on.
pub fn l4_mfn() -> Mfn {
    let info = boot_info();
    let pfn = hypercalls::Pfn::new((info.pt_base - VIRT_BASE) / PAGE_SIZE);
    p2m::pfn_to_mfn(pfn).expect("pt_base lies in the boot mapping (validated)")
}

/// Is `va` an address the kernel may map: not in Xen's reserved L4 slots (256..272)?
/// (`VirtAddr` is canonical by construction.)
fn check_va(va: VirtAddr) -> Result<(), MmError> {
    if (256..272).contains(&u16::from(va.p4_index())) {
        return Err(MmError::ReservedAddress { va: va.as_u64() });
    }
    Ok(())
}

/// The entry at `level` (1..=4) for `va`, if the tables above it exist.
pub fn entry_at(va: VirtAddr, level: u8) -> Result<Option<MachAddr>, MmError> {
    check_va(va)?;
    let mut table = l4_mfn();
    for l in (level + 1..=4).rev() {
        let e = pte::ptep_get(entry_ptr(table, index(va, l)))?;
        if !e.is_present() {
            return Ok(None);
        }
        if e.flags().contains(PageTableFlags::HUGE_PAGE) {
            return Err(MmError::HugePage {
                va: va.as_u64(),
                level: u32::from(l),
            });
        }
        table = e.mfn();
    }
    Ok(Some(entry_ptr(table, index(va, level))))
}

/// The L1 entry value that maps `va` (`None` if no L1 table covers it).
pub fn lookup(va: VirtAddr) -> Result<Option<Pte>, MmError> {
    match entry_at(va, 1)? {
        Some(p) => Ok(Some(pte::ptep_get(p)?)),
        None => Ok(None),
    }
}

/// The L1 entry for `va`, creating the missing tables from frames `alloc` hands out. Returns
/// the entry and, if this call created it, the new L1 table's frame (the upper tables stay in
/// the tree for good).
pub fn ensure_l1(
    va: VirtAddr,
    alloc: &mut dyn FnMut() -> Result<Frame, MmError>,
) -> Result<(MachAddr, Option<Frame>), MmError> {
    let slot = ensure_l2_entry(va, alloc)?;
    let e = pte::ptep_get(slot)?;
    if e.is_present() {
        if e.flags().contains(PageTableFlags::HUGE_PAGE) {
            return Err(MmError::HugePage {
                va: va.as_u64(),
                level: 2,
            });
        }
        return Ok((entry_ptr(e.mfn(), index(va, 1)), None));
    }
    let frame = alloc()?;
    // SAFETY: the entry was read just above and is not present; the frame is fresh and ours.
    unsafe { hook_new_table(slot, &frame, TableLevel::L1)? };
    Ok((entry_ptr(frame.mfn(), index(va, 1)), Some(frame)))
}

/// The L2 entry for `va`, creating the missing L3 and L2 tables from frames `alloc` hands out.
pub fn ensure_l2_entry(
    va: VirtAddr,
    alloc: &mut dyn FnMut() -> Result<Frame, MmError>,
) -> Result<MachAddr, MmError> {
    check_va(va)?;
    let mut table = l4_mfn();
    for (level, new) in [(4u8, TableLevel::L3), (3, TableLevel::L2)] {
        let slot = entry_ptr(table, index(va, level));
        let e = pte::ptep_get(slot)?;
        if e.is_present() {
            if e.flags().contains(PageTableFlags::HUGE_PAGE) {
                return Err(MmError::HugePage {
                    va: va.as_u64(),
                    level: u32::from(level),
                });
            }
            table = e.mfn();
            continue;
        }
        let frame = alloc()?;
        // SAFETY: the entry was read just above and is not present; the frame is fresh and
        // ours; upper tables stay in the tree for good (the frame is given up).
        unsafe { hook_new_table(slot, &frame, new)? };
        table = frame.mfn();
    }
    Ok(entry_ptr(table, index(va, 2)))
}

/// Make the zeroed `frame` a page table of `level` hooked at `slot`: map it read-only in the
/// kernel, pin it, hook it (in a lazy section these ride in the batch, in that order).
///
/// # Safety
/// `slot` must be an entry that is not present (hooking a zeroed table there maps nothing
/// new), and `frame` a fresh, zeroed frame of the caller's that nothing else references.
pub unsafe fn hook_new_table(
    slot: MachAddr,
    frame: &Frame,
    level: TableLevel,
) -> Result<(), MmError> {
    let mfn = frame.mfn();
    // SAFETY: the frame is the caller's and unreferenced; its kernel mapping becomes read-only
    // (a page table may only be mapped so).
    unsafe { pte::update_va_mapping(frame.va(), Pte::new(mfn, KERNEL_RO))? };
    pte::table_op(TableOp::Pin(level, mfn))?;
    // SAFETY: the entry is not present (the caller's promise) and the table is zeroed.
    unsafe { pte::set_table_entry(slot, Pte::new(mfn, TABLE_FLAGS))? };
    Ok(())
}

/// Map `pages` fresh zeroed frames read-write at `va` in one lazy section, taking table and
/// data frames from `alloc`. The frames are given up for good (the heap's use).
///
/// # Safety
/// The range must be reserved for the caller: nothing maps or uses it yet.
pub unsafe fn map_fresh(
    va: VirtAddr,
    pages: u64,
    alloc: &mut dyn FnMut() -> Result<Frame, MmError>,
) -> Result<(), MmError> {
    let section = pte::LazySection::enter()?;
    let mut l1: Option<MachAddr> = None;
    for i in 0..pages {
        let page_va = va + i * PAGE_SIZE;
        let ptep = match l1.and_then(|p| p.entry_in_table(1)) {
            Some(next) if u16::from(page_va.p1_index()) != 0 => next,
            _ => ensure_l1(page_va, alloc)?.0,
        };
        l1 = Some(ptep);
        let frame = alloc()?;
        // SAFETY: the caller reserved the range; the frame is fresh and ours.
        unsafe { pte::set_pte(ptep, Pte::new(frame.mfn(), KERNEL_RW), page_va)? };
    }
    section.leave().map_err(MmError::Mmu)
}
