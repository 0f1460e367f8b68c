//! Return addresses on the frame-pointer chain (the image is built with frame pointers).

use core::fmt::{self, Write};

use super::entry::stack_bounds;

/// Write the return addresses on the chain starting at `rbp`, while it stays inside the kernel
/// stack.
pub fn write(out: &mut dyn Write, mut rbp: u64) -> fmt::Result {
    let (lo, hi) = stack_bounds();
    write!(out, "    backtrace:")?;
    for _ in 0..32 {
        if rbp < lo || rbp.saturating_add(16) > hi || !rbp.is_multiple_of(8) {
            break;
        }
        // SAFETY: rbp points into the kernel stack (checked above): [rbp] = caller's rbp,
        // [rbp + 8] = return address, as every frame-pointer prologue leaves them.
        let (next, ret) = unsafe { (*(rbp as *const u64), *((rbp + 8) as *const u64)) };
        if ret == 0 {
            break;
        }
        write!(out, " {ret:#x}")?;
        rbp = next;
    }
    writeln!(out)
}

/// The current frame pointer.
pub fn current_rbp() -> u64 {
    let rbp: u64;
    // SAFETY: reads the frame pointer register only.
    unsafe { core::arch::asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack)) };
    rbp
}
