//! Spare frames hooked as page tables of the chunk's blocks beyond the region's pages.

use hypercalls::{MachAddr, PAGE_SIZE, Pte};

use super::{MAX_TABLES, Region, TABLE_PAGES};
use crate::mm::MmError;
use crate::mm::pagetable::{self, TABLE_FLAGS};
use crate::mm::pte;

impl Region {
    /// Hook spare `s` as the L1 table of the chunk's 2 MiB block `block` (which holds none of
    /// the region's pages: `block >= MAX_TABLES`). Xen accepts it only if the spare has no
    /// writable mapping; then the block's addresses map what the (zeroed, never written)
    /// spare says: nothing. A block that already has a table is refused (`RegionInUse`).
    pub fn hook_spare(&mut self, s: u64, block: u64) -> Result<(), MmError> {
        let mfn = self.spare_mfn(s)?;
        if !(MAX_TABLES..TABLE_PAGES).contains(&block) {
            return Err(MmError::OutOfRange {
                what: "hook block",
                value: block,
                limit: TABLE_PAGES,
            });
        }
        let va = self.base + block * TABLE_PAGES * PAGE_SIZE;
        let slot = pagetable::entry_at(va, 2)?.ok_or(MmError::RegionInUse { va: va.as_u64() })?;
        // Read through the batch (a hook still queued counts): a block is hooked at most once.
        if pte::ptep_get(slot)?.is_present() {
            return Err(MmError::RegionInUse { va: va.as_u64() });
        }
        if !self.hooked.contains(&block) {
            self.hooked
                .try_reserve(1)
                .map_err(|_| MmError::OutOfMemory {
                    nr_pages: crate::mm::stats().nr_pages,
                })?;
            self.hooked.push(block);
        }
        // SAFETY: the block is the region's, and its entry is empty (read just above); the
        // spare is zeroed and never written (the region never writes spares, and its own
        // addresses are only probed).
        unsafe { pte::set_table_entry(slot, Pte::new(mfn, TABLE_FLAGS)) }.map_err(MmError::Mmu)
    }

    /// The L2 entry for `block` (0..512; to compare with a reported refusal).
    pub fn block_entry(&self, block: u64) -> Result<MachAddr, MmError> {
        if block >= TABLE_PAGES {
            return Err(MmError::OutOfRange {
                what: "block",
                value: block,
                limit: TABLE_PAGES,
            });
        }
        let va = self.base + block * TABLE_PAGES * PAGE_SIZE;
        pagetable::entry_at(va, 2)?.ok_or(MmError::RegionInUse { va: va.as_u64() })
    }
}
