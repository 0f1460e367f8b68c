//! [`Region`]: a range of virtual addresses the kernel reserves for one owner, never mapped
//! otherwise, plus the frames that owner may map there. Because every entry it writes is its
//! own and every frame it maps is its own (or a write Xen always refuses), its methods are safe:
//! this is the API the in-guest tests and the benchmark use (Asterinas OSTD's `VmSpace` and
//! `Segment` are the model). Dropping a region unmaps it and frees its frames and tables.
//!
//! Its data frames are read and written through the kernel's own mapping of them
//! ([`Region::read`], [`Region::write`]), never through the region's addresses, which are only
//! read with fault probes ([`Region::probe`]): so a mapping that changes under the region (a
//! batch not flushed yet, a refused write) can never make safe code touch the wrong memory.

use alloc::vec::Vec;

use hypercalls::{MachAddr, Mfn, PAGE_SIZE, Pte};
use lazy_mmu::{LazyMmu, MmuError, TableLevel, check_set_ptes};
use x86_64::VirtAddr;

use super::frames::Frame;
use super::pagetable::{self, TABLE_FLAGS};
use super::pte::{self, KERNEL_RO, KERNEL_RW};
use super::xen_hv::XenHv;
use super::{MmError, memory};
use crate::arch::probe::{self, Fault};
use crate::xen::events::IrqMutex;
use crate::xen::p2m;

/// The L4 slot for regions (512 GiB), one region per 1 GiB chunk (one L2 table's span).
const REGION_BASE: u64 = 0xFFFF_CA00_0000_0000;
const CHUNK: u64 = 1 << 30;
const CHUNKS: usize = 512;
/// Pages one L1 table maps.
pub const TABLE_PAGES: u64 = 512;
/// 2 MiB blocks of a chunk a region may map pages in; the rest of the chunk is for hooking
/// spare tables ([`Region::hook_spare`]).
pub const MAX_TABLES: u64 = 256;

static CHUNKS_IN_USE: IrqMutex<[bool; CHUNKS]> = IrqMutex::new([false; CHUNKS]);

/// What a region page is made to map. Each value is either the region's own frame or one Xen
/// always refuses, so no value can alias memory someone else uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    /// Nothing (not present).
    None,
    /// Data frame `k`, read-write.
    Frame(u64),
    /// Data frame `k`, read-only.
    FrameReadOnly(u64),
    /// The region's L1 table `t`, writable: Xen always refuses this (a page table may only be
    /// mapped read-only; -EBUSY).
    TableWritable(u64),
    /// Spare frame `s` (see [`Region::hook_spare`]), writable: accepted while the spare is no
    /// page table, refused while it is one.
    SpareWritable(u64),
}

/// An owned range of virtual addresses and the frames mapped there.
pub struct Region {
    chunk: usize,
    base: VirtAddr,
    pages: u64,
    /// L1 table `t` maps pages `t * 512 ..`.
    tables: Vec<Frame>,
    l1: Vec<MachAddr>,
    /// Data frames, consecutive pseudo-physical numbers (what `set_ptes` advances over).
    frames: Vec<Frame>,
    /// Zeroed frames mapped read-only in the kernel (so they can become page tables), never
    /// written.
    spares: Vec<Frame>,
    /// Blocks where a spare may have been hooked.
    hooked: Vec<u64>,
}

impl Region {
    /// Reserve a range of `pages` pages with its page tables, `frames` data frames and
    /// `spares` spare frames. Nothing is mapped yet.
    pub fn new(pages: u64, frames: u64, spares: u64) -> Result<Region, MmError> {
        let mut r = Region::reserve(pages)?;
        for t in 0..pages.div_ceil(TABLE_PAGES) {
            let va = r.base + t * TABLE_PAGES * PAGE_SIZE;
            let (ptep, table) = pagetable::ensure_l1(va, &mut memory::alloc_zeroed)?;
            let table = table.ok_or(MmError::RegionInUse { va: va.as_u64() })?;
            r.l1.push(ptep);
            r.tables.push(table);
        }
        r.frames = memory::alloc_run(frames)?;
        for _ in 0..spares {
            let f = memory::alloc_zeroed()?;
            let ro = Pte::new(f.mfn(), KERNEL_RO);
            // SAFETY: the frame is fresh and the region's: nothing references it, and a
            // read-only mapping cannot change it.
            unsafe { pte::update_va_mapping(f.va(), ro)? };
            r.spares.push(f);
        }
        Ok(r)
    }

    /// Reserve a chunk of address space; nothing allocated yet.
    fn reserve(pages: u64) -> Result<Region, MmError> {
        if pages == 0 || pages > MAX_TABLES * TABLE_PAGES {
            return Err(MmError::OutOfRange {
                what: "region pages",
                value: pages,
                limit: MAX_TABLES * TABLE_PAGES,
            });
        }
        let mut used = CHUNKS_IN_USE.lock();
        let chunk = used.iter().position(|u| !u).ok_or(MmError::OutOfRange {
            what: "regions",
            value: CHUNKS as u64,
            limit: CHUNKS as u64,
        })?;
        used[chunk] = true;
        Ok(Region {
            chunk,
            base: VirtAddr::new(REGION_BASE + chunk as u64 * CHUNK),
            pages,
            tables: Vec::new(),
            l1: Vec::new(),
            frames: Vec::new(),
            spares: Vec::new(),
            hooked: Vec::new(),
        })
    }

    /// Reserve `pages` pages and map page `i` to data frame `i % frames` in one lazy section
    /// that also makes the L1 tables, as a kernel populating fresh memory does: per table,
    /// remap its frame read-only, pin it, hook it, then the table's writes. The walks (and any
    /// missing upper tables) and the table frames are done before the section.
    pub fn new_mapped_lazily(pages: u64, frames: u64) -> Result<Region, MmError> {
        let mut r = Region::reserve(pages)?;
        r.frames = memory::alloc_run(frames.max(1))?;
        let tables = pages.div_ceil(TABLE_PAGES);
        let mut slots = Vec::with_capacity(tables as usize);
        let mut fresh = Vec::with_capacity(tables as usize);
        for t in 0..tables {
            let va = r.va_unchecked(t * TABLE_PAGES);
            let slot = pagetable::ensure_l2_entry(va, &mut memory::alloc_zeroed)?;
            if pte::ptep_get(slot)?.is_present() {
                return Err(MmError::RegionInUse { va: va.as_u64() });
            }
            slots.push(slot);
            fresh.push(memory::alloc_zeroed()?);
        }
        let section = pte::LazySection::enter()?;
        for (t, (slot, table)) in slots.into_iter().zip(fresh).enumerate() {
            // SAFETY: the slot was read above and is not present, and the region's range is
            // its own; the frame is fresh and zeroed.
            unsafe { pagetable::hook_new_table(slot, &table, TableLevel::L1)? };
            r.l1.push(table.mfn().addr());
            r.tables.push(table);
            let first = t as u64 * TABLE_PAGES;
            let n = (pages - first).min(TABLE_PAGES);
            let k = r.frames.len() as u64;
            r.set_each(first, n, |i| Map::Frame(i % k))?;
        }
        section.leave()?;
        Ok(r)
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn va_unchecked(&self, page: u64) -> VirtAddr {
        self.base + page * PAGE_SIZE
    }

    fn check_page(&self, page: u64) -> Result<(), MmError> {
        if page < self.pages {
            Ok(())
        } else {
            Err(MmError::OutOfRange {
                what: "region page",
                value: page,
                limit: self.pages,
            })
        }
    }

    /// The address page `page` is mapped at.
    pub fn va(&self, page: u64) -> Result<VirtAddr, MmError> {
        self.check_page(page)?;
        Ok(self.va_unchecked(page))
    }

    /// Machine address of the L1 entry for `page` (what refusals name).
    pub fn ptep(&self, page: u64) -> Result<MachAddr, MmError> {
        self.check_page(page)?;
        let table = self.l1[(page / TABLE_PAGES) as usize];
        Ok(table
            .entry_in_table(page % TABLE_PAGES)
            .expect("a region's table starts at entry 0"))
    }

    /// Machine frame of data frame `k`.
    pub fn frame_mfn(&self, k: u64) -> Result<Mfn, MmError> {
        self.frames
            .get(k as usize)
            .map(Frame::mfn)
            .ok_or(MmError::OutOfRange {
                what: "region frame",
                value: k,
                limit: self.frames.len() as u64,
            })
    }

    /// Machine frame of spare `s`.
    pub fn spare_mfn(&self, s: u64) -> Result<Mfn, MmError> {
        self.spares
            .get(s as usize)
            .map(Frame::mfn)
            .ok_or(MmError::OutOfRange {
                what: "region spare",
                value: s,
                limit: self.spares.len() as u64,
            })
    }

    /// Machine frame of L1 table `t`.
    pub fn table_mfn(&self, t: u64) -> Result<Mfn, MmError> {
        self.tables
            .get(t as usize)
            .map(Frame::mfn)
            .ok_or(MmError::OutOfRange {
                what: "region table",
                value: t,
                limit: self.tables.len() as u64,
            })
    }

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
    /// per-vCPU batch's lock once. Stops at the first error.
    pub fn set_each(&self, first: u64, n: u64, map: impl Fn(u64) -> Map) -> Result<(), MmError> {
        if n == 0 {
            return Ok(());
        }
        self.check_page(first.saturating_add(n - 1))?;
        pte::with_lazy(|l| {
            for p in first..first + n {
                // In range (checked above): the entry is `p % 512` of table `p / 512`.
                let table = self.l1[(p / TABLE_PAGES) as usize];
                let ptep = MachAddr::new_truncate(table.get() + (p % TABLE_PAGES) * 8);
                let val = self.value(map(p))?;
                l.set_pte(ptep, val, self.va_unchecked(p))?;
            }
            Ok(())
        })
    }

    /// [`Region::set_pte`] into a batch of mm's own (the benchmark's other buffer sizes).
    pub(super) fn set_pte_in<const E: usize, const R: usize>(
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

    /// Hook spare `s` as the L1 table of the chunk's 2 MiB block `block` (which holds none of
    /// the region's pages: `block >= MAX_TABLES`). Xen accepts it only if the spare has no
    /// writable mapping; then the block's addresses map what the (zeroed, never written)
    /// spare says: nothing.
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
        self.hooked.push(block);
        // SAFETY: the block is the region's, unmapped until now; the spare is zeroed and never
        // written (the region never writes spares, and its own addresses are only probed).
        unsafe { pte::set_table_entry(slot, Pte::new(mfn, TABLE_FLAGS)) }.map_err(MmError::Mmu)
    }

    /// The L2 entry for `block` (to compare with a reported refusal).
    pub fn block_entry(&self, block: u64) -> Result<MachAddr, MmError> {
        let va = self.base + (block % TABLE_PAGES) * TABLE_PAGES * PAGE_SIZE;
        pagetable::entry_at(va, 2)?.ok_or(MmError::RegionInUse { va: va.as_u64() })
    }

    /// Invalidate the TLB entry for `page` (rides in the batch in lazy mode).
    pub fn invlpg(&self, page: u64) -> Result<(), MmError> {
        pte::flush_tlb_one(self.va(page)?).map_err(MmError::Mmu)
    }

    /// The entry for `page` (flushing first if a queued write may change it).
    pub fn read_pte(&self, page: u64) -> Result<Pte, MmError> {
        pte::ptep_get(self.ptep(page)?)
    }

    /// The live entry for `page`, without flushing anything.
    pub fn live_pte(&self, page: u64) -> Result<Pte, MmError> {
        pte::live_pte(self.ptep(page)?)
    }

    /// The live entry at `ptr` of the hypervisor's tables, without flushing (for spares).
    pub fn live_entry(&self, ptr: MachAddr) -> Result<Pte, MmError> {
        pte::live_pte(ptr)
    }

    /// Word `word` (0..512) of data frame `k`, through the kernel's own mapping of it.
    pub fn read(&self, k: u64, word: u64) -> Result<u64, MmError> {
        let at = self.word_va(k, word)?;
        // SAFETY: the frame is the region's and mapped read-write in the kernel; `at` is an
        // aligned word inside it.
        Ok(unsafe { core::ptr::read_volatile(at as *const u64) })
    }

    /// Write word `word` of data frame `k` through the kernel's own mapping of it.
    pub fn write(&self, k: u64, word: u64, value: u64) -> Result<(), MmError> {
        let at = self.word_va(k, word)?;
        // SAFETY: as for `read`; the frame holds only the region's data, which no reference
        // points into (the region hands out values, never references).
        unsafe { core::ptr::write_volatile(at as *mut u64, value) };
        Ok(())
    }

    fn word_va(&self, k: u64, word: u64) -> Result<u64, MmError> {
        if word >= PAGE_SIZE / 8 {
            return Err(MmError::OutOfRange {
                what: "word",
                value: word,
                limit: PAGE_SIZE / 8,
            });
        }
        self.frame_mfn(k)?;
        Ok(self.frames[k as usize].va().as_u64() + word * 8)
    }

    /// Read word `word` of `page` through the region's own mapping without a probe, for code
    /// that must find the page mapped (an interrupt handler using the scratch page it just
    /// mapped): a page that is not mapped is a fatal #PF, reported by the trap handler.
    pub fn read_mapped(&self, page: u64, word: u64) -> Result<u64, MmError> {
        self.check_page(page)?;
        if word >= PAGE_SIZE / 8 {
            return Err(MmError::OutOfRange {
                what: "word",
                value: word,
                limit: PAGE_SIZE / 8,
            });
        }
        let va = self.va_unchecked(page).as_u64() + word * 8;
        // SAFETY: the address is the region's own, which maps only the region's frames (kept
        // until the region is dropped) or nothing, in which case the read faults and the fault
        // ends the domain; a volatile read forms no reference.
        Ok(unsafe { core::ptr::read_volatile(va as *const u64) })
    }

    /// Read word `word` of `page` through the region's own mapping, or the fault it raises.
    pub fn probe(&self, page: u64, word: u64) -> Result<u64, Fault> {
        let va = self.va_unchecked(page.min(self.pages - 1)).as_u64() + (word % 512) * 8;
        probe::try_read_u64(va)
    }

    /// Unmap everything, unhook spares, take the tables out and free every frame. A frame is
    /// only freed once nothing can map it any more; if a step fails, what it concerns is leaked
    /// instead.
    fn teardown(&mut self) -> Result<(), MmError> {
        // Everything below must take effect now: a region dropped inside a section (an error
        // path) pauses it; the refusals that pause reports belong to the section's error,
        // which is already in flight.
        let outer = pte::depth();
        if outer > 0 {
            let _ = pte::pause();
        }
        let result = self.teardown_now();
        if outer > 0 {
            pte::resume();
        }
        result
    }

    fn teardown_now(&mut self) -> Result<(), MmError> {
        for t in 0..self.l1.len() as u64 {
            let first = t * TABLE_PAGES;
            let nr = (self.pages - first).min(TABLE_PAGES);
            self.set_ptes(first, nr, Map::None)?;
        }
        for block in core::mem::take(&mut self.hooked) {
            let slot = self.block_entry(block)?;
            if pte::live_pte(slot)?.is_present() {
                // SAFETY: the block is the region's; the spare hooked there maps nothing.
                unsafe { pte::set_table_entry(slot, Pte::NONE)? };
            }
        }
        pte::flush_tlb_local()?;
        for (t, table) in core::mem::take(&mut self.tables).into_iter().enumerate() {
            let va = self.va_unchecked(t as u64 * TABLE_PAGES);
            // SAFETY: every entry of the table was cleared above.
            let frame = unsafe { pagetable::remove_l1(va, table)? };
            memory::free(frame);
        }
        for f in core::mem::take(&mut self.spares) {
            let rw = Pte::new(f.mfn(), KERNEL_RW);
            // SAFETY: the spare is no page table any more (unhooked above) and nothing maps it
            // but the kernel's own read-only mapping, which becomes read-write again.
            unsafe { pte::update_va_mapping(f.va(), rw)? };
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
