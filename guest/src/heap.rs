//! The kernel heap: `linked_list_allocator` over memory the kernel owns.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

const BOOT_HEAP_SIZE: usize = 1024 * 1024;

#[repr(C, align(4096))]
struct BootHeap([u8; BOOT_HEAP_SIZE]);

static mut BOOT_HEAP: BootHeap = BootHeap([0; BOOT_HEAP_SIZE]);

/// Give the allocator its memory.
pub fn init() {
    // SAFETY: BOOT_HEAP is used by nothing but the allocator, and `init` runs once.
    unsafe {
        HEAP.lock()
            .init(&raw mut BOOT_HEAP as *mut u8, BOOT_HEAP_SIZE)
    };
}

/// (used, free) bytes.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
