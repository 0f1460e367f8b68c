//! The kernel heap: `linked_list_allocator` over fresh frames mapped with the lazy-MMU API at
//! [`HEAP_VA`], so the allocator itself is a user of the page-table code.

use linked_list_allocator::LockedHeap;
use x86_64::VirtAddr;

use super::{MmError, memory, pagetable};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

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
            HEAP.lock().init(
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
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
