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

mod map;
mod spares;
mod teardown;

use alloc::vec::Vec;

use hypercalls::{MachAddr, Mfn, PAGE_SIZE, Pte};
use lazy_mmu::TableLevel;
use x86_64::VirtAddr;

use super::frames::Frame;
use super::pagetable;
use super::pte::{self, KERNEL_RO};
use super::{MmError, memory};
use crate::arch::probe::{self, Fault};
use crate::xen::events::IrqMutex;

/// The L4 slot for regions (512 GiB), one region per 1 GiB chunk (one L2 table's span).
const REGION_BASE: u64 = 0xFFFF_CA00_0000_0000;
const CHUNK: u64 = 1 << 30;
const CHUNKS: usize = 512;
/// Pages one L1 table maps.
pub const TABLE_PAGES: u64 = 512;
/// 2 MiB blocks of a chunk a region may map pages in; the rest of the chunk is for hooking
/// spare tables ([`Region::hook_spare`]).
pub const MAX_TABLES: u64 = 256;
/// Most data frames a region may have (as many as it may have pages).
pub const MAX_FRAMES: u64 = MAX_TABLES * TABLE_PAGES;
/// Most spare frames a region may have (as many as it has blocks to hook them in).
pub const MAX_SPARES: u64 = TABLE_PAGES - MAX_TABLES;

static CHUNKS_IN_USE: IrqMutex<[bool; CHUNKS]> = IrqMutex::new([false; CHUNKS]);

/// Why [`Region::probe`] read nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// The page or word is out of range.
    Range(MmError),
    /// The read faulted.
    Fault(Fault),
}

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
        r.reserve_books(frames, spares)?;
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

    /// Check `frames` and `spares` against the limits and against the frames the domain has
    /// left (before anything grows the direct map), and make room for the region's books, so
    /// that a region too large fails with an error before taking anything.
    fn reserve_books(&mut self, frames: u64, spares: u64) -> Result<(), MmError> {
        let limit = |what, value, limit| {
            if value > limit {
                Err(MmError::OutOfRange { what, value, limit })
            } else {
                Ok(())
            }
        };
        limit("region frames", frames, MAX_FRAMES)?;
        limit("region spares", spares, MAX_SPARES)?;
        let tables = self.pages.div_ceil(TABLE_PAGES);
        let oom = || MmError::OutOfMemory {
            nr_pages: super::stats().nr_pages,
        };
        if frames + spares + tables > memory::frames_left() {
            return Err(oom());
        }
        self.tables
            .try_reserve_exact(tables as usize)
            .map_err(|_| oom())?;
        self.l1
            .try_reserve_exact(tables as usize)
            .map_err(|_| oom())?;
        self.frames
            .try_reserve_exact(frames as usize)
            .map_err(|_| oom())?;
        self.spares
            .try_reserve_exact(spares as usize)
            .map_err(|_| oom())?;
        Ok(())
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
        r.reserve_books(frames.max(1), 0)?;
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

    /// Data frames.
    pub fn frames(&self) -> u64 {
        self.frames.len() as u64
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

    /// Read word `word` (0..512) of `page` through the region's own mapping, or the fault it
    /// raises; a page or word out of range is [`ProbeError::Range`].
    pub fn probe(&self, page: u64, word: u64) -> Result<u64, ProbeError> {
        self.check_page(page).map_err(ProbeError::Range)?;
        if word >= PAGE_SIZE / 8 {
            return Err(ProbeError::Range(MmError::OutOfRange {
                what: "word",
                value: word,
                limit: PAGE_SIZE / 8,
            }));
        }
        let va = self.va_unchecked(page).as_u64() + word * 8;
        probe::try_read_u64(va).map_err(ProbeError::Fault)
    }
}
