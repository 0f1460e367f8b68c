//! The kernel heap (mapped through the lazy-MMU API at boot) allocates and frees.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::framework::runner::{Context, TestOutcome};
use crate::mm::heap;

pub fn heap(_: &Context) -> TestOutcome {
    let (used_before, _) = heap::usage();
    let boxed = Box::new([0x5au8; 4096]);
    let v: Vec<u64> = (0..10_000u64).map(|i| i * i).collect();
    let (used_during, _) = heap::usage();
    ensure!(
        used_during >= used_before + 4096 + 80_000,
        "usage {used_before} -> {used_during}"
    );
    ensure!(boxed.iter().all(|&b| b == 0x5a), "box contents changed");
    ensure_eq!(
        v.iter().sum::<u64>(),
        (0..10_000u64).map(|i| i * i).sum::<u64>(),
        "vec sum"
    );
    drop(boxed);
    drop(v);
    ensure_eq!(heap::usage().0, used_before, "usage after free");
    Ok(())
}
