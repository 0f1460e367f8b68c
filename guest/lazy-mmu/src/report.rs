//! Refusals and errors of the lazy-MMU API.
//!
//! A refusal names the request exactly: its multicall entry, its index inside that entry, what
//! it asked for, and Xen's error. Refusals are reported by the call that ends the batching (the
//! outermost leave, a flush or a pause), or by the call itself when nothing is batched.

use core::fmt;

use hypercalls::{MachAddr, Pfn, XenError};

use crate::counters::FlushReason;
use crate::request::Request;

/// One request Xen refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Index of the multicall entry in its flush (0 for a request issued on its own).
    pub entry: u16,
    /// Index of the request inside that entry.
    pub index: u32,
    /// The request; `None` when Xen failed the entry after it had done all its requests
    /// (no request is to blame).
    pub request: Option<Request>,
    pub error: XenError,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.request {
            Some(r) => write!(
                f,
                "entry {} request {}: {r}: Xen error {}",
                self.entry, self.index, self.error
            ),
            None => write!(
                f,
                "entry {} failed after all {} requests were done: Xen error {}",
                self.entry, self.index, self.error
            ),
        }
    }
}

/// How many refusals one report lists (its count covers all).
pub const MAX_REPORTED: usize = 8;

/// The refusals one call reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusals {
    /// How many requests were refused.
    pub count: u32,
    /// The first, in queue order.
    pub first: Refusal,
    /// The flush that issued the first (`None`: it was issued at once, outside lazy mode).
    pub flush: Option<FlushReason>,
}

impl fmt::Display for Refusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.flush {
            Some(reason) => write!(
                f,
                "{} request(s) refused, the first in a {} flush: {}",
                self.count,
                reason.name(),
                self.first
            ),
            None => write!(
                f,
                "{} request(s) refused when issued at once; first: {}",
                self.count, self.first
            ),
        }
    }
}

/// Refusals collected and not yet reported.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Collected {
    pub list: [Option<Refusal>; MAX_REPORTED],
    pub count: u32,
    pub flush: Option<FlushReason>,
}

impl Collected {
    pub const NONE: Collected = Collected {
        list: [None; MAX_REPORTED],
        count: 0,
        flush: None,
    };

    pub fn new(flush: Option<FlushReason>) -> Collected {
        Collected {
            flush,
            ..Collected::NONE
        }
    }

    pub fn push(&mut self, r: Refusal) {
        if let Some(slot) = self.list.get_mut(self.count as usize) {
            *slot = Some(r);
        }
        self.count = self.count.saturating_add(1);
    }

    /// Add the refusals collected later.
    pub fn merge(&mut self, later: &Collected) {
        if later.count == 0 {
            return;
        }
        if self.count == 0 {
            self.flush = later.flush;
        }
        let listed = later.list.iter().flatten().count() as u32;
        for r in later.list.iter().flatten() {
            self.push(*r);
        }
        self.count = self.count.saturating_add(later.count - listed);
    }

    pub fn as_error(&self) -> Result<(), MmuError> {
        match self.list[0] {
            Some(first) => Err(MmuError::Refused(Refusals {
                count: self.count,
                first,
                flush: self.flush,
            })),
            None => Ok(()),
        }
    }
}

/// Which rule of `set_ptes()`'s contract a call broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetPtesRule {
    /// `nr` must be at least 1.
    ZeroCount,
    /// `addr` must be page aligned.
    UnalignedAddress { addr: u64 },
    /// `ptep` must be the machine address of an 8-byte entry.
    UnalignedPtep { ptep: MachAddr },
    /// All `nr` entries must lie in one L1 table.
    CrossesTable { first_index: u64, nr: u64 },
    /// `ptep` must be the entry that maps `addr`.
    PtepMismatch { addr_index: u64, ptep_index: u64 },
    /// The frames `first_pfn..first_pfn + nr` must all belong to the domain.
    FramesBeyondDomain {
        first_pfn: Pfn,
        nr: u64,
        nr_pages: u64,
    },
    /// The value's machine frame is not one of the domain's.
    ForeignFrame { raw: u64 },
}

impl fmt::Display for SetPtesRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SetPtesRule::ZeroCount => write!(f, "set_ptes: nr must be >= 1 (got 0)"),
            SetPtesRule::UnalignedAddress { addr } => {
                write!(f, "set_ptes: addr {addr:#x} is not page aligned")
            }
            SetPtesRule::UnalignedPtep { ptep } => {
                write!(f, "set_ptes: ptep {ptep} is not 8-byte aligned")
            }
            SetPtesRule::CrossesTable { first_index, nr } => write!(
                f,
                "set_ptes: {nr} entries from index {first_index} cross the end of the L1 table (512 entries)"
            ),
            SetPtesRule::FramesBeyondDomain {
                first_pfn,
                nr,
                nr_pages,
            } => write!(
                f,
                "set_ptes: {nr} frames from pfn {first_pfn} run past the domain's {nr_pages:#x} pages"
            ),
            SetPtesRule::ForeignFrame { raw } => write!(
                f,
                "set_ptes: value {raw:#x} maps a machine frame that is not this domain's"
            ),
            SetPtesRule::PtepMismatch {
                addr_index,
                ptep_index,
            } => write!(
                f,
                "set_ptes: ptep is entry {ptep_index} of its table but addr needs entry {addr_index}"
            ),
        }
    }
}

/// Errors of the lazy-MMU API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuError {
    /// Xen refused requests; every other request took effect, in queue order.
    Refused(Refusals),
    /// `leave()` without a matching `enter()`.
    UnbalancedLeave,
    /// `resume()` without a matching `pause()`.
    UnbalancedResume,
    /// A nested `enter()` in strict mode (the pre-fix behaviour, where Linux hit `BUG()`).
    NestedEnter { depth: u32 },
    /// `enter()` or `pause()` beyond [`crate::NESTING_LIMIT`] levels (Linux warns there).
    NestingLimit { what: &'static str },
    /// `set_ptes()` contract violation; nothing was queued.
    SetPtes(SetPtesRule),
    /// A page-table entry in a frame that is not this domain's.
    NotOwned { ptr: MachAddr },
    /// A page-table entry's machine address that is not 8-byte aligned; nothing was queued.
    UnalignedPtr { ptr: MachAddr },
    /// A lazy section left while a pause taken inside it is still in force (the leave would be
    /// ignored, as Linux ignores it, and the section would stay open).
    LeaveWhilePaused { pause: u32 },
    /// A context switch inside an interrupt handler.
    SwitchInInterrupt,
    /// `irq_exit()` without `irq_enter()`.
    UnbalancedIrqExit,
    /// [`crate::SwitchRule::WasLazyFlag`]: a task switched out while nested in lazy mode
    /// leaves the CPU in lazy MMU mode, and the switch's `enter_lazy(XEN_LAZY_CPU)` hits its
    /// `BUG_ON`.
    LazyModeAtSwitch { nesting: u32 },
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::Refused(r) => write!(f, "{r}"),
            MmuError::UnbalancedLeave => {
                write!(
                    f,
                    "unbalanced lazy MMU leave: leave() without a matching enter()"
                )
            }
            MmuError::UnbalancedResume => write!(
                f,
                "unbalanced lazy MMU resume: resume() without a matching pause()"
            ),
            MmuError::NestedEnter { depth } => {
                write!(f, "BUG: nested lazy MMU enter (depth {depth}, lazy=strict)")
            }
            MmuError::NestingLimit { what } => write!(
                f,
                "lazy MMU {what} nested deeper than {} levels",
                crate::NESTING_LIMIT
            ),
            MmuError::SetPtes(rule) => write!(f, "{rule}"),
            MmuError::UnalignedPtr { ptr } => write!(
                f,
                "page-table entry address {ptr} is not 8-byte aligned (its low bits would be another mmu_update command)"
            ),
            MmuError::LeaveWhilePaused { pause } => write!(
                f,
                "lazy section left while paused {pause} time(s) inside it: resume() first"
            ),
            MmuError::SwitchInInterrupt => {
                write!(f, "BUG: context switch inside an interrupt handler")
            }
            MmuError::UnbalancedIrqExit => write!(f, "BUG: irq_exit() without irq_enter()"),
            MmuError::LazyModeAtSwitch { nesting } => write!(
                f,
                "BUG: enter_lazy(XEN_LAZY_CPU) at a context switch while the CPU is still in lazy MMU mode (nesting {nesting}, lazy=was-lazy-flag)"
            ),
            MmuError::NotOwned { ptr } => write!(
                f,
                "page-table entry at machine address {ptr} is not in a frame of this domain"
            ),
        }
    }
}
