//! Free pseudo-physical frames: the domain's memory after everything Xen put in the boot
//! mapping. A frame is handed out mapped read-write: in the rest of Xen's boot mapping
//! (`VIRT_BASE + pfn * 4096`), then in the direct map (`DIRECT_MAP_BASE + pfn * 4096`), which
//! [`super::memory`] grows one L1 table at a time before the mapped frames run out. This module
//! only keeps the books; it knows nothing of page tables.

use core::sync::atomic::{AtomicU64, Ordering};

use hypercalls::{Mfn, PAGE_SIZE, Pfn};
use x86_64::VirtAddr;

use super::MmError;
use crate::xen::p2m;
use crate::xen::start_info::{DIRECT_MAP_BASE, VIRT_BASE, boot_info};

/// Frames below this are mapped by Xen's boot mapping at `VIRT_BASE` (set by [`init`]).
static BOOT_MAP_END_PFN: AtomicU64 = AtomicU64::new(0);
/// Frames from [`BOOT_MAP_END_PFN`] up to this are mapped in the direct map.
static MAPPED_END_PFN: AtomicU64 = AtomicU64::new(0);

/// Frames below this are in Xen's boot mapping. Before [`init`] found its end, the boot
/// structures (everything Xen placed up to the boot stack) are known to be.
fn boot_map_end() -> u64 {
    BOOT_MAP_END_PFN
        .load(Ordering::Relaxed)
        .max(boot_info().first_free_pfn)
}

/// Kernel virtual address of pseudo-physical frame `pfn` (`pfn < nr_pages`): in the boot
/// mapping or in the direct map, whether or not that part is mapped yet.
pub fn va_of(pfn: Pfn) -> u64 {
    let pfn = pfn.get();
    if pfn < boot_map_end() {
        VIRT_BASE + pfn * PAGE_SIZE
    } else {
        DIRECT_MAP_BASE.wrapping_add(pfn.wrapping_mul(PAGE_SIZE))
    }
}

/// Where frame `pfn` can be read now: `Some` only if the boot mapping or the direct map maps
/// it (read-write for the allocator's frames, read-only for page tables).
/// The image's pages whose mapping was changed (the shared-page slots) are not: their frames
/// are read through `peek`.
pub fn mapped_va(pfn: Pfn) -> Option<u64> {
    let mapped = pfn.get() < boot_map_end() || pfn.get() < MAPPED_END_PFN.load(Ordering::Acquire);
    let va = va_of(pfn);
    (mapped && !image_hole(va)).then_some(va)
}

/// A page of the boot mapping whose mapping the kernel changed.
fn image_hole(va: u64) -> bool {
    (VIRT_BASE..crate::arch::entry::image_end()).contains(&va)
        && crate::xen::shared::is_slot_page(va)
}

/// A frame the allocator handed out: owned by whoever holds this (not `Clone`), mapped
/// read-write at [`Frame::va`] unless its owner made it a page table.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pfn: Pfn,
    mfn: Mfn,
}

impl Frame {
    /// The frame `pfn` of the allocator's range (below `nr_pages`).
    fn from_pfn(pfn: Pfn) -> Frame {
        let mfn = p2m::pfn_to_mfn(pfn).expect("the allocator hands out frames below nr_pages");
        Frame { pfn, mfn }
    }

    pub fn pfn(&self) -> Pfn {
        self.pfn
    }

    pub fn mfn(&self) -> Mfn {
        self.mfn
    }

    /// Where the kernel maps it (boot mapping or direct map).
    pub fn va(&self) -> VirtAddr {
        VirtAddr::new(va_of(self.pfn))
    }
}

/// Mapped frames kept back so that growing the direct map can take its page tables from them.
pub const RESERVE: u64 = 4;

struct FrameAllocator {
    /// Next never-used frame.
    next_pfn: u64,
    /// Frames below this are mapped (boot mapping, then direct map).
    mapped_end_pfn: u64,
    nr_pages: u64,
    /// Returned frames, linked through their first word (pfn + 1; 0 ends the list).
    free_head: u64,
    allocated: u64,
}

static FRAMES: crate::xen::events::IrqMutex<FrameAllocator> =
    crate::xen::events::IrqMutex::new(FrameAllocator {
        next_pfn: 0,
        mapped_end_pfn: 0,
        nr_pages: 0,
        free_head: 0,
        allocated: 0,
    });

/// What the allocator has done so far.
#[derive(Clone, Copy, Debug)]
pub struct FrameStats {
    pub mapped_end_pfn: u64,
    pub allocated: u64,
    pub nr_pages: u64,
}

/// Start handing out frames after Xen's boot structures; the boot mapping ends at
/// `boot_map_end` (found by the caller's walk).
pub fn init(first_free_pfn: u64, boot_map_end: u64, nr_pages: u64) {
    BOOT_MAP_END_PFN.store(boot_map_end, Ordering::Relaxed);
    MAPPED_END_PFN.store(boot_map_end, Ordering::Release);
    let mut f = FRAMES.lock();
    f.next_pfn = first_free_pfn;
    f.mapped_end_pfn = boot_map_end;
    f.nr_pages = nr_pages;
}

pub fn stats() -> FrameStats {
    let f = FRAMES.lock();
    FrameStats {
        mapped_end_pfn: f.mapped_end_pfn,
        allocated: f.allocated,
        nr_pages: f.nr_pages,
    }
}

/// Frames not handed out (free list, mapped or not yet mapped).
pub fn left() -> u64 {
    let first = boot_info().first_free_pfn;
    let f = FRAMES.lock();
    (f.nr_pages - first).saturating_sub(f.allocated)
}

/// Never-used mapped frames, and whether a growth of the direct map could add more: the range
/// `(mapped_end, end of its L1 table or of the domain)`.
pub fn spare() -> (u64, Option<(u64, u64)>) {
    let f = FRAMES.lock();
    let spare = f.mapped_end_pfn - f.next_pfn;
    let grow = (f.mapped_end_pfn < f.nr_pages).then(|| {
        let start = f.mapped_end_pfn;
        let table_end = (start / 512 + 1) * 512;
        (start, table_end.min(f.nr_pages))
    });
    (spare, grow)
}

/// The direct map now maps frames up to `end`.
pub fn grown_to(end: u64) {
    let mut f = FRAMES.lock();
    f.mapped_end_pfn = f.mapped_end_pfn.max(end);
    MAPPED_END_PFN.store(f.mapped_end_pfn, Ordering::Release);
}

fn zeroed(pfn: Pfn) -> Frame {
    let frame = Frame::from_pfn(pfn);
    // SAFETY: the frame was just taken from the allocator: it is ours alone, and mapped
    // read-write at its va (the allocator only hands out mapped frames).
    unsafe { core::ptr::write_bytes(frame.va().as_mut_ptr::<u8>(), 0, PAGE_SIZE as usize) };
    frame
}

/// A zeroed frame from what is mapped now (the free list first); `OutOfMemory` if none is.
pub fn take_zeroed() -> Result<Frame, MmError> {
    let mut f = FRAMES.lock();
    let pfn = if f.free_head != 0 {
        let pfn = Pfn::new(f.free_head - 1);
        // SAFETY: a listed frame is ours, mapped read-write, and holds the link in word 0.
        f.free_head = unsafe { core::ptr::read(va_of(pfn) as *const u64) };
        pfn
    } else if f.next_pfn < f.mapped_end_pfn {
        f.next_pfn += 1;
        Pfn::new(f.next_pfn - 1)
    } else {
        return Err(MmError::OutOfMemory {
            nr_pages: f.nr_pages,
        });
    };
    f.allocated += 1;
    drop(f);
    Ok(zeroed(pfn))
}

/// `n` zeroed never-used frames with consecutive pseudo-physical numbers.
pub fn take_run(n: u64) -> Result<alloc::vec::Vec<Frame>, MmError> {
    let mut out = alloc::vec::Vec::new();
    out.try_reserve_exact(n as usize)
        .map_err(|_| MmError::OutOfMemory {
            nr_pages: stats().nr_pages,
        })?;
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
    out.extend((first..first + n).map(|p| zeroed(Pfn::new(p))));
    Ok(out)
}

/// Give a frame back. Its owner checked that it is mapped read-write at [`Frame::va`] and
/// mapped or used nowhere else.
pub fn put(frame: Frame) {
    let first = boot_info().first_free_pfn;
    let mut f = FRAMES.lock();
    // Handing back a boot frame would corrupt the kernel: a BUG, caught here.
    assert!(
        (first..f.mapped_end_pfn).contains(&frame.pfn.get()),
        "BUG: frames::put of pfn {}, not an allocatable frame ({first:#x}..{:#x})",
        frame.pfn,
        f.mapped_end_pfn
    );
    // SAFETY: the frame is handed over (the caller checked its mapping is read-write); word 0
    // holds the link from now on.
    unsafe { core::ptr::write(frame.va().as_mut_ptr::<u64>(), f.free_head) };
    f.free_head = frame.pfn.get() + 1;
    f.allocated -= 1;
}
