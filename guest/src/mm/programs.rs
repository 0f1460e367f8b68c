//! Seeded lazy-MMU programs (`lazy_mmu::program`) run against real Xen on a [`Region`]: the
//! in-guest stress test. The layout (which entries the slots are, which values they get) is
//! the region's, so a program can only write the region's own entries with its own frames or
//! the value Xen always refuses.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use hypercalls::{MachAddr, Pte};
use lazy_mmu::program::{self, Layout, Observer, Op, RunStats, Stepper};
use lazy_mmu::{Counters, FlushReason, LazyMmu, MmuError};
use x86_64::VirtAddr;

use super::MmError;
use super::pte;
use super::region::{Map, Region, TABLE_PAGES};
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
    check_ops(ops, region.pages(), region.frames())?;
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

/// Every op's slots and frames lie in a layout of `slots` slots and `frames` frames (checked
/// before anything runs: the layout's lookups would otherwise fail with the batch locked).
pub fn check_ops(ops: &[Op], slots: u64, frames: u64) -> Result<(), String> {
    for (i, op) in ops.iter().enumerate() {
        let (slot, nr, frame) = match *op {
            Op::SetPte { slot, frame } => (slot, 1, Some(frame)),
            Op::SetPtes { slot, nr, frame } => (slot, nr, Some(frame)),
            Op::Clear { slot } | Op::Read { slot } | Op::Bad { slot } | Op::Invlpg { slot } => {
                (slot, 1, None)
            }
            _ => continue,
        };
        let (slot, nr) = (slot as u64, nr as u64);
        if nr == 0 || slot.checked_add(nr).is_none_or(|end| end > slots) {
            return Err(format!(
                "op {i} ({op:?}): slots beyond the layout's {slots}"
            ));
        }
        if frame.is_some_and(|f| (f as u64).checked_add(nr).is_none_or(|end| end > frames)) {
            return Err(format!(
                "op {i} ({op:?}): frames beyond the layout's {frames}"
            ));
        }
    }
    Ok(())
}

/// Flushes of `reason` in a run.
pub fn flushes(run: &ProgramRun, reason: FlushReason) -> u64 {
    run.counters.flushes_for(reason)
}

/// The layout of one task of the preempt test: slots 0..512 are its own region's first L1
/// table, slots 512..1024 its part (L1 table `part`) of a region shared by all tasks, which
/// only this task writes and every task reads. Every slot maps data frames of the shared
/// region (so the shared region must outlive the task's own one, which unmaps them when it is
/// dropped); the refused value is a writable mapping of the task's own L1 table.
pub struct TaskLayout {
    own: Arc<Region>,
    shared: Arc<Region>,
    part: u64,
    added_by_xen: u64,
}

/// Slots of a task's program: its own table, then its part of the shared region.
pub const TASK_SLOTS: usize = 1024;

impl TaskLayout {
    pub fn new(own: Arc<Region>, shared: Arc<Region>, part: u64) -> Result<TaskLayout, MmError> {
        shared.ptep((part + 1) * TABLE_PAGES - 1)?;
        own.ptep(TABLE_PAGES - 1)?;
        let added_by_xen = added_by_xen(&own)?;
        Ok(TaskLayout {
            own,
            shared,
            part,
            added_by_xen,
        })
    }

    /// The shared region's page for slot `slot` (>= 512).
    pub fn shared_page(part: u64, slot: usize) -> u64 {
        part * TABLE_PAGES + (slot as u64 - TABLE_PAGES)
    }

    fn page(&self, slot: usize) -> (&Region, u64) {
        if (slot as u64) < TABLE_PAGES {
            (&self.own, slot as u64)
        } else {
            (&self.shared, Self::shared_page(self.part, slot))
        }
    }
}

impl Layout for TaskLayout {
    fn pte_ptr(&self, slot: usize) -> MachAddr {
        let (r, p) = self.page(slot);
        r.ptep(p).expect("slots lie in the regions")
    }

    fn va(&self, slot: usize) -> VirtAddr {
        let (r, p) = self.page(slot);
        r.va(p).expect("slots lie in the regions")
    }

    fn pte_value(&self, frame: usize) -> Pte {
        let v = self.shared.value(Map::Frame(frame as u64));
        Pte::from_raw(v.expect("frames lie in the shared region").raw() | self.added_by_xen)
    }

    fn bad_value(&self) -> Pte {
        self.own
            .value(Map::TableWritable(0))
            .expect("a region has a table")
    }
}

/// No per-op hooks: [`TaskProgram::step`] checks after outermost leaves itself.
struct NoHooks;

impl<const E: usize, const R: usize> Observer<XenHv, E, R> for NoHooks {}

/// One task's seeded program on the per-vCPU batch, one op at a time: each op runs with the
/// batch locked (events masked), so the task can be preempted between any two ops, in or out
/// of a lazy section.
pub struct TaskProgram {
    layout: TaskLayout,
    ops: Vec<Op>,
    stepper: Stepper,
    /// Outermost leaves after which the live tables were compared with the shadow.
    pub checks: u64,
}

impl TaskProgram {
    pub fn new(layout: TaskLayout, ops: Vec<Op>) -> Result<TaskProgram, String> {
        check_ops(&ops, TASK_SLOTS as u64, layout.shared.frames())?;
        let stepper = pte::with_lazy(|l| Stepper::new(l, &layout, &ops))?;
        Ok(TaskProgram {
            layout,
            ops,
            stepper,
            checks: 0,
        })
    }

    /// Ops left.
    pub fn remaining(&self) -> usize {
        self.ops.len() - self.stepper.ops_done()
    }

    /// Run the next op; after an outermost leave compare the task's slots with the shadow.
    /// Returns the slots whose shadow value the op may have changed.
    pub fn step(&mut self) -> Result<core::ops::Range<usize>, String> {
        let i = self.stepper.ops_done();
        let op = self.ops[i];
        let (stepper, layout) = (&mut self.stepper, &self.layout);
        let outermost = pte::with_lazy(|l| -> Result<bool, String> {
            // The programs are balanced: only a model that loses a task's nesting at a switch
            // (`lazy=was-lazy-flag`) gets here, and that is Linux's BUG, as in the kernel API.
            if op == Op::Leave && l.depth() == 0 && !l.is_paused() {
                panic!("BUG: {} (op {i})", MmuError::UnbalancedLeave);
            }
            stepper.step(l, layout, &op, &mut NoHooks)?;
            let outermost =
                matches!(op, Op::Leave | Op::SetPtes { .. }) && l.depth() == 0 && !l.is_paused();
            if outermost {
                program::compare(l, layout, stepper.shadow(), TASK_SLOTS)
                    .map_err(|e| format!("op {i} ({op:?}), after the outermost leave: {e}"))?;
            }
            Ok(outermost)
        })?;
        if outermost {
            self.checks += 1;
        }
        Ok(match op {
            Op::SetPte { slot, .. } | Op::Clear { slot } => slot..slot + 1,
            Op::SetPtes { slot, nr, .. } => slot..slot + nr,
            _ => 0..0,
        })
    }

    /// The value slot `slot` must hold once nothing is queued.
    pub fn expected(&self, slot: usize) -> Pte {
        let shadow = self.stepper.shadow();
        if slot < shadow.len() {
            shadow.get(slot)
        } else {
            Pte::NONE
        }
    }

    /// After the last op: every refusal reported, and all the task's slots as the shadow says.
    pub fn finish(self) -> Result<RunStats, String> {
        let TaskProgram {
            layout, stepper, ..
        } = self;
        pte::with_lazy(|l| {
            program::compare(l, &layout, stepper.shadow(), TASK_SLOTS)
                .map_err(|e| format!("at the end: {e}"))?;
            stepper.finish(l)
        })
    }
}
