//! Seeded random programs of lazy-MMU operations, shared by host property tests and the in-guest
//! stress test.
//!
//! [`generate`] makes a balanced program (every lazy section and pause closed, properly nested);
//! [`generate_with`] can add writes Xen must refuse and queued TLB flushes. [`run`] executes a
//! program through the [`crate::LazyMmu`] API while keeping a [`Shadow`]: the value every slot
//! would hold if each write took effect the moment it was made (a refused write changes
//! nothing). Callers compare the live page tables with the shadow after every leave, when the
//! batching promises they agree. [`run`] also checks that every refusal is reported exactly
//! once, by the call that ends the batching.

mod generate;
mod rng;
mod run;

pub use generate::{GenError, GenOptions, MIN_OPS, Op, check, generate, generate_with};
pub use rng::Rng;
pub use run::{Observer, RunStats, Shadow, Stepper, compare, run, run_with};

use hypercalls::{MachAddr, Pte};
use x86_64::VirtAddr;

use crate::model::{ENTRIES, PAGE_SHIFT, Space};

/// Where the slots of a stress program live.
///
/// Slot `s` is entry `s % 512` of the `s / 512`-th L1 table, so `va(s)` must be page aligned and
/// map entry `s % 512` of its table (as `set_ptes()` checks).
pub trait Layout {
    /// Machine address of the slot's L1 entry.
    fn pte_ptr(&self, slot: usize) -> MachAddr;
    /// The virtual address the slot maps.
    fn va(&self, slot: usize) -> VirtAddr;
    /// The entry mapping data frame `frame` (never 0; 0 clears a slot). It must be the value as
    /// Xen stores it (a 64-bit PV guest's L1 entries get `_PAGE_USER` and, for kernel mappings,
    /// `_PAGE_GUEST_KERNEL` added), so that reading it back compares equal.
    fn pte_value(&self, frame: usize) -> Pte;
    /// An entry Xen refuses in every slot for the whole program, e.g. a writable mapping of one
    /// of the page-table frames (`get_page_from_l1e`: -EBUSY). Used by [`Op::Bad`].
    fn bad_value(&self) -> Pte;
}

/// The model's address space as a program's slots: slot `s` is entry `s % 512` of L1 table
/// `s / 512`.
impl Layout for Space {
    fn pte_ptr(&self, slot: usize) -> MachAddr {
        MachAddr::new_truncate(
            self.l1s[slot / ENTRIES] << PAGE_SHIFT | ((slot % ENTRIES) as u64 * 8),
        )
    }

    fn va(&self, slot: usize) -> VirtAddr {
        VirtAddr::new_truncate(Space::BASE_VA + slot as u64 * 4096)
    }

    fn pte_value(&self, frame: usize) -> Pte {
        Pte::from_raw(Space::pte(self.data[frame], Space::DATA_FLAGS))
    }

    /// A writable mapping of the first L1 table, which stays in use as one (-EBUSY).
    fn bad_value(&self) -> Pte {
        Pte::from_raw(Space::pte(self.l1s[0], Space::DATA_FLAGS))
    }
}
