//! Seeded lazy-MMU programs (`lazy_mmu::program`) run against real Xen on a [`Region`]: the
//! in-guest stress test. The layout (which entries the slots are, which values they get) is
//! the region's, so a program can only write the region's own entries with its own frames or
//! the value Xen always refuses.

use alloc::format;
use alloc::string::String;

use hypercalls::{MachAddr, Pte};
use lazy_mmu::program::{self, Layout, Op, RunStats};
use lazy_mmu::{Counters, FlushReason, LazyMmu};
use x86_64::VirtAddr;

use super::MmError;
use super::pte;
use super::region::{Map, Region};
use super::xen_hv::XenHv;

/// Which batch runs the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSize {
    /// The kernel's own per-vCPU batch (64 entries / 1024 requests).
    PerCpu,
    /// A tiny one (4 entries / 16 requests), so that full-buffer flushes happen all the time.
    Tiny,
}

impl BatchSize {
    pub fn name(self) -> &'static str {
        match self {
            BatchSize::PerCpu => "per-vCPU batch (64/1024)",
            BatchSize::Tiny => "tiny batch (4/16)",
        }
    }
}

/// What one run did.
pub struct ProgramRun {
    pub stats: RunStats,
    /// Leaves after which the live tables were compared with the shadow.
    pub checks: u64,
    /// The batch's counters over the run.
    pub counters: Counters,
}

/// Slots are the region's pages, frames its data frames.
struct RegionLayout<'a> {
    region: &'a Region,
    /// Bits Xen adds to a kernel L1 entry (USER and its guest-kernel bit): the values read
    /// back are what the shadow must hold.
    added_by_xen: u64,
}

impl Layout for RegionLayout<'_> {
    fn pte_ptr(&self, slot: usize) -> MachAddr {
        self.region
            .ptep(slot as u64)
            .expect("slots lie in the region")
    }

    fn va(&self, slot: usize) -> VirtAddr {
        self.region
            .va(slot as u64)
            .expect("slots lie in the region")
    }

    fn pte_value(&self, frame: usize) -> Pte {
        let v = self.region.value(Map::Frame(frame as u64));
        Pte::from_raw(v.expect("frames lie in the region").raw() | self.added_by_xen)
    }

    /// A writable mapping of the region's first L1 table: Xen refuses it (-EBUSY) in every
    /// slot.
    fn bad_value(&self) -> Pte {
        self.region
            .value(Map::TableWritable(0))
            .expect("a region has a table")
    }
}

/// Learn what Xen adds to a kernel mapping by writing one and reading it back.
fn added_by_xen(region: &Region) -> Result<u64, MmError> {
    let written = region.value(Map::Frame(0))?;
    region.set_pte(0, Map::Frame(0))?;
    let stored = region.read_pte(0)?;
    region.set_pte(0, Map::None)?;
    Ok(stored.raw() & !written.raw())
}

/// Run `ops` on `region` (slots: its pages; frames: its data frames) through `batch`,
/// comparing the live tables with the shadow after every leave.
pub fn run(region: &Region, ops: &[Op], batch: BatchSize) -> Result<ProgramRun, String> {
    let layout = RegionLayout {
        region,
        added_by_xen: added_by_xen(region).map_err(|e| format!("probe write: {e}"))?,
    };
    let slots = region.pages() as usize;
    match batch {
        BatchSize::PerCpu => pte::with_lazy(|l| run_in(l, &layout, ops, slots)),
        BatchSize::Tiny => {
            let mut tiny: LazyMmu<XenHv, 4, 16> = LazyMmu::new(XenHv::new());
            run_in(&mut tiny, &layout, ops, slots)
        }
    }
}

fn run_in<const E: usize, const R: usize>(
    lazy: &mut LazyMmu<XenHv, E, R>,
    layout: &RegionLayout<'_>,
    ops: &[Op],
    slots: usize,
) -> Result<ProgramRun, String> {
    let before = lazy.counters();
    let mut checks = 0u64;
    let stats = program::run(lazy, layout, ops, |lazy, shadow| {
        checks += 1;
        program::compare(lazy, layout, shadow, slots)
    })?;
    Ok(ProgramRun {
        stats,
        checks,
        counters: lazy.counters().since(&before),
    })
}

/// Flushes of `reason` in a run.
pub fn flushes(run: &ProgramRun, reason: FlushReason) -> u64 {
    run.counters.flushes_for(reason)
}
