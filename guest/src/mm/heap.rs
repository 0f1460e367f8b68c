//! The kernel heap: `linked_list_allocator` over fresh frames mapped with the lazy-MMU API at
//! [`HEAP_VA`], so the allocator itself is a user of the page-table code.

use linked_list_allocator::LockedHeap;

use crate::mm::{MmError, pagetable};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Where the heap lives: its own L4 slot, far from the image and the direct map.
pub const HEAP_VA: u64 = 0xFFFF_C900_0000_0000;
pub const HEAP_PAGES: u64 = 1024;

/// Map the heap's pages and give them to the allocator.
pub fn init() -> Result<(), MmError> {
    pagetable::map_fresh(HEAP_VA, HEAP_PAGES, |_, _| {})?;
    // SAFETY: the range was just mapped read-write for the heap alone, and `init` runs once.
    unsafe {
        HEAP.lock()
            .init(HEAP_VA as *mut u8, (HEAP_PAGES * 4096) as usize)
    };
    Ok(())
}

/// (used, free) bytes.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
