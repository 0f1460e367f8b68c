//! The kernel heap: `linked_list_allocator` over fresh frames mapped with the lazy-MMU API at
//! [`HEAP_VA`], so the allocator itself is a user of the page-table code.

use core::alloc::{GlobalAlloc, Layout};

use linked_list_allocator::LockedHeap;
use x86_64::VirtAddr;

use super::{MmError, memory, pagetable};
use crate::xen::events::IrqGuard;

/// The allocator, with events masked while it works: an upcall handler or a preempting task
/// never finds its lock taken.
struct IrqSafeHeap(LockedHeap);

// SAFETY: every call goes to `LockedHeap`'s own implementation; masking events around it
// changes nothing it relies on.
unsafe impl GlobalAlloc for IrqSafeHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _irq = IrqGuard::new();
        // SAFETY: the caller's promises are passed on unchanged.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _irq = IrqGuard::new();
        // SAFETY: as for `alloc`.
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static HEAP: IrqSafeHeap = IrqSafeHeap(LockedHeap::empty());

/// Where the heap lives: its own L4 slot, far from the image and the direct map.
pub const HEAP_VA: u64 = 0xFFFF_C900_0000_0000;
pub const HEAP_PAGES: u64 = 1024;

static INIT: spin::Once<()> = spin::Once::new();

/// Map the heap's pages and give them to the allocator (once).
pub fn init() -> Result<(), MmError> {
    INIT.try_call_once(|| {
        // SAFETY: the heap's L4 slot is reserved for it and nothing maps it before this.
        unsafe {
            pagetable::map_fresh(
                VirtAddr::new(HEAP_VA),
                HEAP_PAGES,
                &mut memory::alloc_zeroed,
            )?
        };
        // SAFETY: the range was just mapped read-write for the heap alone, and this runs once.
        unsafe {
            HEAP.0.lock().init(
                HEAP_VA as *mut u8,
                (HEAP_PAGES * hypercalls::PAGE_SIZE) as usize,
            )
        };
        Ok(())
    })
    .map(drop)
}

/// (used, free) bytes.
pub fn usage() -> (usize, usize) {
    let _irq = IrqGuard::new();
    let heap = HEAP.0.lock();
    (heap.used(), heap.free())
}
