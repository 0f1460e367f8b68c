//! The kernel's stack and the image's bounds (from the linker script). `_start` (in `main.rs`)
//! switches to [`BOOT_STACK`] before any Rust code runs.

use core::cell::UnsafeCell;

pub const BOOT_STACK_SIZE: usize = 64 * 1024;

/// The kernel's stack (Xen's boot stack is a single page).
#[repr(C, align(4096))]
pub struct Stack(UnsafeCell<[u8; BOOT_STACK_SIZE]>);

// SAFETY: the stack's bytes are only ever used by the CPU through rsp; no Rust reference to its
// contents is ever formed (only its address is taken, for the backtrace's bounds).
unsafe impl Sync for Stack {}

/// The stack `_start` switches to.
#[unsafe(no_mangle)]
pub static BOOT_STACK: Stack = Stack(UnsafeCell::new([0; BOOT_STACK_SIZE]));

/// `[low, high)` of the kernel stack.
pub fn stack_bounds() -> (u64, u64) {
    let lo = BOOT_STACK.0.get() as u64;
    (lo, lo + BOOT_STACK_SIZE as u64)
}

unsafe extern "C" {
    static __image_end: u8;
}

/// End of the kernel image (page aligned, after .bss).
pub fn image_end() -> u64 {
    &raw const __image_end as u64
}
