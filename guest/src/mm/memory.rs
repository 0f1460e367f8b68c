//! Frames for the rest of the kernel: the allocator's frames, with the direct map grown (one
//! L1 table, 2 MiB, at a time) before the mapped frames run out, and a check on every frame
//! given back. Nothing beyond what the allocator has reached is mapped, so any amount of memory
//! Xen gives the domain costs only its P2M.

use core::sync::atomic::{AtomicBool, Ordering};

use hypercalls::{PAGE_SIZE, Pfn, Pte};
use x86_64::VirtAddr;
use x86_64::structures::paging::PageTableFlags;

use super::MmError;
use super::frames::{self, Frame, RESERVE};
use super::pagetable;
use super::pte::{self, KERNEL_RW};
use crate::xen::p2m;
use crate::xen::start_info::{BOOT_MAP_MAX_PAGES, BootInfo, DIRECT_MAP_BASE, VIRT_BASE};

/// Find where Xen's boot mapping ends (it maps frame N at `VIRT_BASE + N` pages) and start the
/// allocator after the boot structures.
pub fn init(info: &BootInfo) -> Result<(), MmError> {
    let limit = info.nr_pages.min(BOOT_MAP_MAX_PAGES);
    let boot_va = |pfn: u64| VirtAddr::new(VIRT_BASE + pfn * PAGE_SIZE);
    let mut end = info.first_free_pfn;
    while end < limit && pagetable::lookup(boot_va(end))?.is_some_and(|p| p.is_present()) {
        end += 1;
    }
    if end > 0 {
        let last = pagetable::lookup(boot_va(end - 1))?.expect("boot mapping has holes");
        assert_eq!(
            Some(last.mfn()),
            p2m::pfn_to_mfn(Pfn::new(end - 1)),
            "boot mapping is not the linear map"
        );
    }
    frames::init(info.first_free_pfn, end, info.nr_pages);
    Ok(())
}

/// A growth of the direct map is under way: its own allocations come from the reserve.
static GROWING: AtomicBool = AtomicBool::new(false);

/// Grow the direct map until at least `wanted` never-used frames beyond the reserve are mapped,
/// or the domain's memory ends.
fn ensure_spare(wanted: u64) -> Result<(), MmError> {
    loop {
        let (spare, grow) = frames::spare();
        let Some((start, end)) = grow else {
            return Ok(());
        };
        if spare >= wanted.saturating_add(RESERVE) || GROWING.swap(true, Ordering::Acquire) {
            return Ok(());
        }
        let grown = grow_direct_map(start, end);
        GROWING.store(false, Ordering::Release);
        grown?;
        frames::grown_to(end);
    }
}

/// Map frames `start..end` (at most one L1 table's worth, beyond the boot mapping) into the
/// direct map, taking any new page table from the reserve.
fn grow_direct_map(start: u64, end: u64) -> Result<(), MmError> {
    let va = VirtAddr::new(DIRECT_MAP_BASE + start * PAGE_SIZE);
    let (ptep, _) = pagetable::ensure_l1(va, &mut frames::take_zeroed)?;
    let first = p2m::pfn_to_mfn(Pfn::new(start)).ok_or(MmError::OutOfMemory {
        nr_pages: frames::stats().nr_pages,
    })?;
    // SAFETY: the direct map's range for frames not handed out yet is unmapped and reserved
    // for them; the frames are the domain's and free.
    unsafe { pte::set_ptes(va, ptep, Pte::new(first, KERNEL_RW), end - start)? };
    Ok(())
}

/// Frames the domain has left to hand out (mapped or not), beyond the reserve.
pub fn frames_left() -> u64 {
    frames::left().saturating_sub(RESERVE)
}

/// A zeroed frame, mapped read-write (boot mapping or direct map).
pub fn alloc_zeroed() -> Result<Frame, MmError> {
    ensure_spare(1)?;
    frames::take_zeroed()
}

/// `n` zeroed frames with consecutive pseudo-physical numbers (what `set_ptes` advances
/// over), mapped read-write.
pub fn alloc_run(n: u64) -> Result<alloc::vec::Vec<Frame>, MmError> {
    ensure_spare(n)?;
    frames::take_run(n)
}

/// Give a frame back. It must be mapped read-write (not a page table) and used nowhere else:
/// handing back a page table would corrupt the kernel, so that is a BUG, caught here.
pub fn free(frame: Frame) {
    let linear = pagetable::lookup(frame.va()).ok().flatten();
    assert!(
        linear.is_some_and(|p| p.flags().contains(PageTableFlags::WRITABLE)),
        "BUG: free of pfn {}, which is not mapped writable (a page table?)",
        frame.pfn()
    );
    frames::put(frame);
}
