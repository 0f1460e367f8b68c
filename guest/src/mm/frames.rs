//! Free pseudo-physical frames: the domain's memory after everything Xen put in the boot
//! mapping. Frames are handed out mapped read-write in the kernel's linear map
//! (`VIRT_BASE + pfn * 4096`); the linear map grows one L1 table (2 MiB) at a time, with the
//! lazy-MMU API, before the mapped frames run out.

use super::MmError;
use super::pagetable;
use super::pte::{self, KERNEL_RW, Pte};
use crate::xen::{self, PAGE_SIZE};

/// A frame we own, mapped read-write at [`Frame::va`] in the linear map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub pfn: u64,
    pub mfn: u64,
}

impl Frame {
    pub fn from_pfn(pfn: u64) -> Frame {
        Frame {
            pfn,
            mfn: xen::pfn_to_mfn(pfn),
        }
    }

    pub fn va(&self) -> u64 {
        xen::pfn_to_va(self.pfn)
    }
}

/// Mapped frames kept back so that growing the linear map can take its page tables from them.
const RESERVE: u64 = 4;

struct FrameAllocator {
    /// Next never-used frame.
    next_pfn: u64,
    /// Frames below this are mapped in the linear map.
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
    let mut end = info.first_free_pfn;
    while end < info.nr_pages
        && pagetable::lookup(xen::pfn_to_va(end))?.is_some_and(|p| p.is_present())
    {
        end += 1;
    }
    // The boot mapping maps frame N at VIRT_BASE + N pages: check the last one to be sure.
    if end > 0 {
        let last = pagetable::lookup(xen::pfn_to_va(end - 1))?.expect("boot mapping has holes");
        assert_eq!(
            last.mfn(),
            xen::pfn_to_mfn(end - 1),
            "boot mapping is not the linear map"
        );
    }
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

/// Grow the linear map (a table at a time) until at least `wanted` never-used frames beyond the
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
        let grown = grow_linear_map(growth.0, growth.1);
        let mut f = FRAMES.lock();
        f.growing = false;
        grown?;
        f.mapped_end_pfn = growth.1;
    }
}

fn zeroed(pfn: u64) -> Frame {
    let frame = Frame::from_pfn(pfn);
    // SAFETY: the frame is ours alone and mapped read-write in the linear map.
    unsafe { core::ptr::write_bytes(frame.va() as *mut u8, 0, PAGE_SIZE as usize) };
    frame
}

/// A zeroed frame, mapped read-write in the linear map.
pub fn alloc_zeroed() -> Result<Frame, MmError> {
    if FRAMES.lock().free_head == 0 {
        ensure_spare(1)?;
    }
    let mut f = FRAMES.lock();
    let pfn = if f.free_head != 0 {
        let pfn = f.free_head - 1;
        // SAFETY: a listed frame is ours, mapped read-write, and holds the link in word 0.
        f.free_head = unsafe { core::ptr::read(xen::pfn_to_va(pfn) as *const u64) };
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
/// mapped read-write in the linear map.
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

/// Give a frame back. It must be mapped read-write in the linear map (not a page table) and
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
    // SAFETY: the caller hands the frame over; its linear mapping is read-write.
    unsafe { core::ptr::write(frame.va() as *mut u64, f.free_head) };
    f.free_head = frame.pfn + 1;
    f.allocated -= 1;
}

/// Map frames `start..end` (one L1 table's worth at most) into the linear map.
fn grow_linear_map(start: u64, end: u64) -> Result<(), MmError> {
    let va = xen::pfn_to_va(start);
    let ptep = pagetable::ensure_l1(va)?;
    pte::set_ptes(va, ptep, Pte::from_pfn(start, KERNEL_RW), end - start)?;
    Ok(())
}
