//! Free pseudo-physical frames: the domain's memory after everything Xen put in the boot
//! mapping. Frames are handed out mapped read-write: the rest of Xen's boot mapping first
//! (`VIRT_BASE + pfn * 4096`), then the direct map (`DIRECT_MAP_BASE + pfn * 4096`), which
//! grows one L1 table (2 MiB) at a time, with the lazy-MMU API, before the mapped frames run out.
//! Nothing beyond what the allocator has reached is mapped, so any amount of memory Xen gives
//! the domain costs only its P2M.

use core::sync::atomic::{AtomicU64, Ordering};

use super::MmError;
use super::pagetable;
use super::pte::{self, KERNEL_RW, Pte};
use crate::xen::{self, DIRECT_MAP_BASE, PAGE_SIZE, VIRT_BASE};

/// Frames below this are mapped by Xen's boot mapping at `VIRT_BASE` (set by [`init`]).
static BOOT_MAP_END_PFN: AtomicU64 = AtomicU64::new(0);
/// Frames from [`BOOT_MAP_END_PFN`] up to this are mapped in the direct map.
static MAPPED_END_PFN: AtomicU64 = AtomicU64::new(0);

/// Frames below this are in Xen's boot mapping. Before [`init`] found its end, the boot
/// structures (everything Xen placed up to the boot stack) are known to be.
fn boot_map_end() -> u64 {
    BOOT_MAP_END_PFN
        .load(Ordering::Relaxed)
        .max(xen::boot_info().first_free_pfn)
}

/// Kernel virtual address of pseudo-physical frame `pfn` (`pfn < nr_pages`): in the boot
/// mapping or in the direct map, whether or not that part is mapped yet.
pub fn va_of(pfn: u64) -> u64 {
    if pfn < boot_map_end() {
        VIRT_BASE + pfn * PAGE_SIZE
    } else {
        DIRECT_MAP_BASE.wrapping_add(pfn.wrapping_mul(PAGE_SIZE))
    }
}

/// Where frame `pfn` can be read now: `Some` only if the boot mapping or the direct map maps
/// it (read-write for the allocator's frames, read-only for page tables).
pub fn mapped_va(pfn: u64) -> Option<u64> {
    let mapped = pfn < boot_map_end() || pfn < MAPPED_END_PFN.load(Ordering::Acquire);
    mapped.then(|| va_of(pfn))
}

/// A frame we own, mapped read-write at [`Frame::va`] (boot mapping or direct map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub pfn: u64,
    pub mfn: u64,
}

impl Frame {
    /// The frame `pfn` of the allocator's range (below `nr_pages`).
    fn from_pfn(pfn: u64) -> Frame {
        let mfn = xen::pfn_to_mfn(pfn).expect("the allocator hands out frames below nr_pages");
        Frame { pfn, mfn }
    }

    pub fn va(&self) -> u64 {
        va_of(self.pfn)
    }
}

/// Mapped frames kept back so that growing the direct map can take its page tables from them.
const RESERVE: u64 = 4;

struct FrameAllocator {
    /// Next never-used frame.
    next_pfn: u64,
    /// Frames below this are mapped (boot mapping, then direct map).
    mapped_end_pfn: u64,
    nr_pages: u64,
    /// Returned frames, linked through their first word (pfn + 1; 0 ends the list).
    free_head: u64,
    /// A growth is under way: its own allocations come from the reserve.
    growing: bool,
    allocated: u64,
}

static FRAMES: spin::Mutex<FrameAllocator> = spin::Mutex::new(FrameAllocator {
    next_pfn: 0,
    mapped_end_pfn: 0,
    nr_pages: 0,
    free_head: 0,
    growing: false,
    allocated: 0,
});

/// What the allocator has done so far.
#[derive(Clone, Copy, Debug)]
pub struct FrameStats {
    pub mapped_end_pfn: u64,
    pub allocated: u64,
}

/// Find where the boot mapping ends and start handing out frames after Xen's boot structures.
pub fn init(info: &xen::BootInfo) -> Result<(), MmError> {
    let limit = info.nr_pages.min(xen::BOOT_MAP_MAX_PAGES);
    let boot_va = |pfn: u64| VIRT_BASE + pfn * PAGE_SIZE;
    let mut end = info.first_free_pfn;
    while end < limit && pagetable::lookup(boot_va(end))?.is_some_and(|p| p.is_present()) {
        end += 1;
    }
    // The boot mapping maps frame N at VIRT_BASE + N pages: check the last one to be sure.
    if end > 0 {
        let last = pagetable::lookup(boot_va(end - 1))?.expect("boot mapping has holes");
        assert_eq!(
            Some(last.mfn()),
            xen::pfn_to_mfn(end - 1),
            "boot mapping is not the linear map"
        );
    }
    BOOT_MAP_END_PFN.store(end, Ordering::Relaxed);
    MAPPED_END_PFN.store(end, Ordering::Release);
    let mut f = FRAMES.lock();
    f.next_pfn = info.first_free_pfn;
    f.mapped_end_pfn = end;
    f.nr_pages = info.nr_pages;
    Ok(())
}

pub fn stats() -> FrameStats {
    let f = FRAMES.lock();
    FrameStats {
        mapped_end_pfn: f.mapped_end_pfn,
        allocated: f.allocated,
    }
}

/// Grow the direct map (a table at a time) until at least `wanted` never-used frames beyond the
/// reserve are mapped, or the domain's memory ends. Growth itself takes its page tables from
/// the reserve.
fn ensure_spare(wanted: u64) -> Result<(), MmError> {
    loop {
        let growth = {
            let mut f = FRAMES.lock();
            let spare = f.mapped_end_pfn - f.next_pfn;
            if spare >= wanted + RESERVE || f.growing || f.mapped_end_pfn >= f.nr_pages {
                return Ok(());
            }
            f.growing = true;
            let start = f.mapped_end_pfn;
            let table_end = (start / 512 + 1) * 512;
            (start, table_end.min(f.nr_pages))
        };
        let grown = grow_direct_map(growth.0, growth.1);
        let mut f = FRAMES.lock();
        f.growing = false;
        grown?;
        f.mapped_end_pfn = growth.1;
        MAPPED_END_PFN.store(growth.1, Ordering::Release);
    }
}

fn zeroed(pfn: u64) -> Frame {
    let frame = Frame::from_pfn(pfn);
    // SAFETY: the frame is ours alone and mapped read-write (boot mapping or direct map).
    unsafe { core::ptr::write_bytes(frame.va() as *mut u8, 0, PAGE_SIZE as usize) };
    frame
}

/// A zeroed frame, mapped read-write (boot mapping or direct map).
pub fn alloc_zeroed() -> Result<Frame, MmError> {
    if FRAMES.lock().free_head == 0 {
        ensure_spare(1)?;
    }
    let mut f = FRAMES.lock();
    let pfn = if f.free_head != 0 {
        let pfn = f.free_head - 1;
        // SAFETY: a listed frame is ours, mapped read-write, and holds the link in word 0.
        f.free_head = unsafe { core::ptr::read(va_of(pfn) as *const u64) };
        pfn
    } else if f.next_pfn < f.mapped_end_pfn {
        f.next_pfn += 1;
        f.next_pfn - 1
    } else {
        return Err(MmError::OutOfMemory {
            nr_pages: f.nr_pages,
        });
    };
    f.allocated += 1;
    drop(f);
    Ok(zeroed(pfn))
}

/// `n` zeroed frames with consecutive pseudo-physical numbers (what `set_ptes` advances over),
/// mapped read-write (boot mapping or direct map).
pub fn alloc_run(n: u64) -> Result<alloc::vec::Vec<Frame>, MmError> {
    ensure_spare(n)?;
    let first = {
        let mut f = FRAMES.lock();
        if f.mapped_end_pfn - f.next_pfn < n {
            return Err(MmError::OutOfMemory {
                nr_pages: f.nr_pages,
            });
        }
        f.next_pfn += n;
        f.allocated += n;
        f.next_pfn - n
    };
    Ok((first..first + n).map(zeroed).collect())
}

/// Give a frame back. It must be mapped read-write (boot mapping or direct map) (not a page table) and
/// no longer mapped or used anywhere else.
pub fn free(frame: Frame) {
    // Handing back a boot frame or a page table would corrupt the kernel: a BUG, caught here.
    let first = xen::boot_info().first_free_pfn;
    let mapped_end = FRAMES.lock().mapped_end_pfn;
    assert!(
        (first..mapped_end).contains(&frame.pfn),
        "BUG: frames::free of pfn {:#x}, not an allocatable frame ({first:#x}..{mapped_end:#x})",
        frame.pfn
    );
    let linear = pagetable::lookup(frame.va()).ok().flatten();
    assert!(
        linear.is_some_and(|p| p
            .flags()
            .contains(x86_64::structures::paging::PageTableFlags::WRITABLE)),
        "BUG: frames::free of pfn {:#x}, which is not mapped writable (a page table?)",
        frame.pfn
    );
    let mut f = FRAMES.lock();
    // SAFETY: the caller hands the frame over; its mapping is read-write.
    unsafe { core::ptr::write(frame.va() as *mut u64, f.free_head) };
    f.free_head = frame.pfn + 1;
    f.allocated -= 1;
}

/// Map frames `start..end` (one L1 table's worth at most, beyond the boot mapping, below
/// `nr_pages`) into the direct map.
fn grow_direct_map(start: u64, end: u64) -> Result<(), MmError> {
    let va = va_of(start);
    let ptep = pagetable::ensure_l1(va)?;
    let first = Pte::from_pfn(start, KERNEL_RW).ok_or(MmError::OutOfMemory {
        nr_pages: xen::boot_info().nr_pages,
    })?;
    pte::set_ptes(va, ptep, first, end - start)?;
    Ok(())
}
