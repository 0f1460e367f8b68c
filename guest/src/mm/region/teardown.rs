//! Dropping a region: unmap its pages, unhook its spares, take its tables out and free every
//! frame. The teardown issues its own requests at once, outside the batch, and judges only
//! their results: a section it is dropped in keeps its queued writes' refusals for its leave
//! (the batch is paused without reporting), and refusals pending from earlier sections stay
//! pending.

use alloc::vec::Vec;

use hypercalls::Pte;
use hypercalls::abi::pt_update;
use lazy_mmu::TableOp;

use super::{CHUNKS_IN_USE, Region, TABLE_PAGES};
use crate::mm::pte::{self, KERNEL_RW};
use crate::mm::{MmError, memory, pagetable};

impl Region {
    /// Unmap everything, unhook spares, take the tables out and free every frame. A frame is
    /// only freed once nothing can map it any more; if a step fails, what it concerns is leaked
    /// instead.
    fn teardown(&mut self) -> Result<(), MmError> {
        // Flush what is queued (a section's writes may touch nothing of ours, but the read
        // path and the requests below must see the tables as they are), keeping its refusals
        // for the section.
        pte::pause_deferring().map_err(MmError::Mmu)?;
        let result = self.teardown_now();
        pte::resume();
        result
    }

    fn teardown_now(&mut self) -> Result<(), MmError> {
        let none = Pte::NONE;
        let mut reqs = Vec::new();
        reqs.try_reserve_exact(TABLE_PAGES as usize)
            .map_err(|_| MmError::OutOfMemory {
                nr_pages: crate::mm::stats().nr_pages,
            })?;
        for t in 0..self.l1.len() as u64 {
            reqs.clear();
            let first = t * TABLE_PAGES;
            for p in first..(first + TABLE_PAGES).min(self.pages) {
                reqs.push(pt_update(self.ptep(p)?, none));
            }
            // SAFETY: the entries are the region's own; nothing references what they map.
            unsafe { pte::mmu_update_now(&reqs)? };
        }
        for block in core::mem::take(&mut self.hooked) {
            let slot = self.block_entry(block)?;
            if pte::live_pte(slot)?.is_present() {
                // SAFETY: the block is the region's; the spare hooked there maps nothing.
                unsafe { pte::mmu_update_now(&[pt_update(slot, none)])? };
            }
        }
        // SAFETY: a TLB flush changes no mapping.
        unsafe { pte::table_ops_now(&[TableOp::TlbFlushLocal])? };
        for (t, table) in core::mem::take(&mut self.tables).into_iter().enumerate() {
            let va = self.va_unchecked(t as u64 * TABLE_PAGES);
            let slot =
                pagetable::entry_at(va, 2)?.ok_or(MmError::RegionInUse { va: va.as_u64() })?;
            // SAFETY: the L2 entry is the region's and the table under it maps nothing any more
            // (cleared above); the unpinned table is the region's, unhooked just before; its
            // kernel mapping becomes read-write again once it is no table.
            unsafe {
                pte::mmu_update_now(&[pt_update(slot, none)])?;
                pte::table_ops_now(&[TableOp::Unpin(table.mfn()), TableOp::TlbFlushLocal])?;
                pte::update_va_mapping_now(table.va(), Pte::new(table.mfn(), KERNEL_RW))?;
            }
            memory::free(table);
        }
        for f in core::mem::take(&mut self.spares) {
            let rw = Pte::new(f.mfn(), KERNEL_RW);
            // SAFETY: the spare is no page table any more (unhooked above) and nothing maps it
            // but the kernel's own read-only mapping, which becomes read-write again.
            unsafe { pte::update_va_mapping_now(f.va(), rw)? };
            memory::free(f);
        }
        for f in core::mem::take(&mut self.frames) {
            memory::free(f);
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            // The frames not yet freed stay with the region's leaked chunk.
            crate::println!("warning: region at {:#x} leaked: {e}", self.base.as_u64());
            return;
        }
        CHUNKS_IN_USE.lock()[self.chunk] = false;
    }
}
