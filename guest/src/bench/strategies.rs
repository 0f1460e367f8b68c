//! The ways of mapping then unmapping N pages of the benchmark's region, all through the safe
//! API (`Region`, `mm::pte` sections, `mm::batches`). Every unmap ends with one local TLB
//! flush.

use lazy_mmu::Counters;

use crate::mm::MmError;
use crate::mm::batches::{LinuxBatch, LowerBound};
use crate::mm::pte;
use crate::mm::region::{Map, Region, TABLE_PAGES};

/// Frames the pages map, over and over (mapping a frame many times is legal).
pub const POOL: u64 = 512;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// No lazy mode, one `mmu_update` per PTE.
    Eager,
    /// The per-vCPU batch (64 entries / 1024 requests), one section, `set_pte` per page.
    Lazy,
    /// Generic `set_ptes()` per L1 table inside an outer section (nested leaves flush).
    SetPtes,
    /// All requests prepared beforehand: one `mmu_update` to map, one multicall of
    /// `mmu_update` + TLB flush to unmap.
    LowerBound,
    /// The code of `Lazy` with Linux's buffer (32 entries / 32 requests).
    LinuxLike,
}

pub const STRATEGIES: [Strategy; 5] = [
    Strategy::Eager,
    Strategy::Lazy,
    Strategy::SetPtes,
    Strategy::LowerBound,
    Strategy::LinuxLike,
];

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Eager => "eager",
            Strategy::Lazy => "lazy",
            Strategy::SetPtes => "set_ptes",
            Strategy::LowerBound => "lower_bound",
            Strategy::LinuxLike => "linux_like",
        }
    }
}

/// What page `i` maps.
pub fn map_of(i: u64) -> Map {
    Map::Frame(i % POOL)
}

/// The region and the strategies' own state.
pub struct Bench<'r> {
    pub region: &'r Region,
    lower: LowerBound<'r>,
    linux: LinuxBatch,
}

impl<'r> Bench<'r> {
    pub fn new(region: &'r Region) -> Result<Self, MmError> {
        Ok(Bench {
            region,
            lower: LowerBound::prepare(region, map_of)?,
            linux: LinuxBatch::new(),
        })
    }

    /// Map (`clear == false`) or unmap pages `0..n`.
    pub fn run(&mut self, s: Strategy, n: u64, clear: bool) -> Result<(), MmError> {
        let r = self.region;
        let value = |i| if clear { Map::None } else { map_of(i) };
        match s {
            Strategy::Eager => {
                for i in 0..n {
                    r.set_pte(i, value(i))?;
                }
                if clear {
                    pte::flush_tlb_local()?;
                }
                Ok(())
            }
            Strategy::Lazy => in_section(|| {
                r.set_each(0, n, value)?;
                if clear {
                    pte::flush_tlb_local()?;
                }
                Ok(())
            }),
            Strategy::SetPtes => in_section(|| {
                let mut i = 0;
                while i < n {
                    let nr = (n - i).min(TABLE_PAGES);
                    r.set_ptes(i, nr, value(i))?;
                    i += nr;
                }
                if clear {
                    pte::flush_tlb_local()?;
                }
                Ok(())
            }),
            Strategy::LowerBound if clear => self.lower.unmap(n),
            Strategy::LowerBound => self.lower.map(n),
            Strategy::LinuxLike if clear => self.linux.unmap_pages(r, n),
            Strategy::LinuxLike => self.linux.map_pages(r, n, map_of),
        }
    }

    pub fn counters(&self, s: Strategy) -> Counters {
        match s {
            Strategy::LowerBound => self.lower.counters(),
            Strategy::LinuxLike => self.linux.counters(),
            _ => pte::counters(),
        }
    }
}

/// Run `f` in a lazy section of the per-vCPU batch.
pub fn in_section(f: impl FnOnce() -> Result<(), MmError>) -> Result<(), MmError> {
    let section = pte::LazySection::enter()?;
    f()?;
    section.leave().map_err(MmError::Mmu)
}
