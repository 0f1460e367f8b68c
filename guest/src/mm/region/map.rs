//! Making a region's pages map its own frames: entry values, `set_pte`, `set_each`,
//! `set_ptes`.

use alloc::vec::Vec;

use hypercalls::{MachAddr, Pte};
use lazy_mmu::{LazyMmu, MmuError, check_set_ptes};

use super::{Map, Region, TABLE_PAGES};
use crate::mm::MmError;
use crate::mm::pte::{self, KERNEL_RO, KERNEL_RW};
use crate::mm::xen_hv::XenHv;
use crate::xen::p2m;

/// Pages whose values [`Region::set_each`] computes before taking the per-vCPU lock.
const EACH_CHUNK: usize = 64;

impl Region {
    /// The entry value for `map`.
    pub fn value(&self, map: Map) -> Result<Pte, MmError> {
        Ok(match map {
            Map::None => Pte::NONE,
            Map::Frame(k) => Pte::new(self.frame_mfn(k)?, KERNEL_RW),
            Map::FrameReadOnly(k) => Pte::new(self.frame_mfn(k)?, KERNEL_RO),
            Map::TableWritable(t) => Pte::new(self.table_mfn(t)?, KERNEL_RW),
            Map::SpareWritable(s) => Pte::new(self.spare_mfn(s)?, KERNEL_RW),
        })
    }

    /// What an entry value read from this region maps, if it is one of the region's values.
    pub fn map_of(&self, pte: Pte) -> Option<Map> {
        if !pte.is_present() {
            return Some(Map::None);
        }
        let first = self.frames.first()?.pfn().get();
        let k = p2m::owned_pfn(pte.mfn())?.get().checked_sub(first)?;
        if k >= self.frames.len() as u64 {
            return None;
        }
        let writable = pte
            .flags()
            .contains(x86_64::structures::paging::PageTableFlags::WRITABLE);
        Some(if writable {
            Map::Frame(k)
        } else {
            Map::FrameReadOnly(k)
        })
    }

    /// Make `page` map `map`: queued in a lazy section, at once otherwise.
    pub fn set_pte(&self, page: u64, map: Map) -> Result<(), MmError> {
        let (ptep, val, va) = (self.ptep(page)?, self.value(map)?, self.va_unchecked(page));
        // SAFETY: the entry is the region's own (its range is never mapped otherwise, and
        // nothing references it: the region's addresses are only read by fault probes), and
        // the value maps one of its frames or is one Xen refuses.
        unsafe { pte::set_pte(ptep, val, va) }.map_err(MmError::Mmu)
    }

    /// [`Region::set_pte`] for pages `first..first + n` (page `p` maps `map(p)`), one call
    /// each, as a loop of `set_pte` in the caller's section would make them, but taking the
    /// per-vCPU batch's lock once per [`EACH_CHUNK`] pages. `map` runs outside the lock (it may
    /// use any of the kernel's API, reads included). Stops at the first error.
    pub fn set_each(&self, first: u64, n: u64, map: impl Fn(u64) -> Map) -> Result<(), MmError> {
        if n == 0 {
            return Ok(());
        }
        self.check_page(first.saturating_add(n - 1))?;
        let mut vals = [Pte::NONE; EACH_CHUNK];
        let mut p = first;
        while p < first + n {
            let end = (first + n).min(p + EACH_CHUNK as u64);
            let mut ready = 0;
            let mut error = None;
            for (i, q) in (p..end).enumerate() {
                match self.value(map(q)) {
                    Ok(v) => {
                        vals[i] = v;
                        ready += 1;
                    }
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            pte::with_lazy(|l| -> Result<(), MmError> {
                for (i, q) in (p..p + ready).enumerate() {
                    // In range (checked above): the entry is `q % 512` of table `q / 512`.
                    let table = self.l1[(q / TABLE_PAGES) as usize];
                    let ptep = MachAddr::new_truncate(table.get() + (q % TABLE_PAGES) * 8);
                    l.set_pte(ptep, vals[i], self.va_unchecked(q))?;
                }
                Ok(())
            })?;
            if let Some(e) = error {
                return Err(e);
            }
            p = end;
        }
        Ok(())
    }

    /// [`Region::set_pte`] into a batch of mm's own (the benchmark's other buffer sizes).
    pub(in crate::mm) fn set_pte_in<const E: usize, const R: usize>(
        &self,
        lazy: &mut LazyMmu<XenHv, E, R>,
        page: u64,
        map: Map,
    ) -> Result<(), MmError> {
        let (ptep, val, va) = (self.ptep(page)?, self.value(map)?, self.va_unchecked(page));
        // The same entries and values as `set_pte`, through a batch over the same Xen.
        lazy.set_pte(ptep, val, va).map_err(MmError::Mmu)
    }

    /// Linux's `set_ptes()` on `nr` pages from `page`: page `page + i` maps data frame `k + i`
    /// for `first == Frame(k)` (or `FrameReadOnly(k)`), nothing for `Map::None`. The contract
    /// (count, one L1 table) is checked first, as `set_ptes()` does, then the region's bounds;
    /// nothing is queued on an error. Overflow-proof for any `nr`.
    pub fn set_ptes(&self, page: u64, nr: u64, first: Map) -> Result<(), MmError> {
        let (ptep, va) = (self.ptep(page)?, self.va_unchecked(page));
        check_set_ptes(va, ptep, nr).map_err(|r| MmError::Mmu(MmuError::SetPtes(r)))?;
        // The contract holds: nr <= 512 and the entries stay in the table.
        self.check_page(page + nr - 1)?;
        let k = match first {
            Map::None => None,
            Map::Frame(k) | Map::FrameReadOnly(k) => Some(k),
            Map::TableWritable(_) | Map::SpareWritable(_) if nr == 1 => None,
            _ => {
                return Err(MmError::OutOfRange {
                    what: "set_ptes of a table or spare frame, nr",
                    value: nr,
                    limit: 1,
                });
            }
        };
        if let Some(k) = k {
            self.frame_mfn(k.saturating_add(nr - 1))?;
        }
        let val = self.value(first)?;
        // SAFETY: as for `set_pte`: the entries are the region's own and the frames (checked
        // just above to be consecutive data frames of the region) too.
        unsafe { pte::set_ptes(va, ptep, val, nr) }.map_err(MmError::Mmu)
    }

    /// `set_ptes()` with a value of its own for each page: page `page + i` maps `maps[i]`
    /// (the core's `set_ptes` takes any per-entry values; Linux's advances the frame). Checked
    /// and reported as [`Region::set_ptes`].
    pub fn set_ptes_each(&self, page: u64, maps: &[Map]) -> Result<(), MmError> {
        let nr = maps.len() as u64;
        let (ptep, va) = (self.ptep(page)?, self.va_unchecked(page));
        check_set_ptes(va, ptep, nr).map_err(|r| MmError::Mmu(MmuError::SetPtes(r)))?;
        self.check_page(page + nr - 1)?;
        let mut vals = Vec::with_capacity(maps.len());
        for m in maps {
            vals.push(self.value(*m)?);
        }
        // The region's own entries, each given one of its own values (as `set_pte`), through
        // the per-vCPU batch.
        pte::with_lazy(|l| l.set_ptes(va, ptep, nr, |i| vals[i as usize])).map_err(MmError::Mmu)
    }
}
