//! The kernel's page-table write API: `set_pte`, `set_ptes`, `ptep_get` and the lazy-MMU
//! section calls, over the per-vCPU [`LazyMmu`] batch and real Xen.
//!
//! PTE values are machine values (Xen PV page tables hold MFNs); [`Pte::from_pfn`] translates a
//! pseudo-physical frame through the P2M, and `set_ptes` advances frame by frame in
//! pseudo-physical space, as Linux's `pte_next_pfn()` does on Xen PV.
//!
//! Contract (as for Linux's `set_pte`): these calls change live mappings, which no type system
//! can check; a caller only maps and unmaps addresses it owns (fresh frames, its own regions),
//! never memory that other code still references.

use core::fmt;

use hypercalls::abi::{MMUEXT_INVLPG_LOCAL, MMUEXT_TLB_FLUSH_LOCAL};
use hypercalls::abi::{MmuextOp, UVMF_INVLPG, mmuext_plain, mmuext_va};
use x86_64::structures::paging::PageTableFlags;

use super::MmError;
use super::lazy::{Counters, LazyMmu, MmuError, SetPtesRule};
use super::xen_hv::XenHv;
use crate::xen;

/// Most vCPUs the per-vCPU state is sized for (the guest brings up one).
pub const MAX_VCPUS: usize = 1;

/// One vCPU's lazy-MMU state behind its lock.
struct PerCpuLazy(spin::Mutex<LazyMmu<XenHv>>);

// SAFETY: the only non-Send part is the raw `vcpumask` pointer inside queued `mmuext_op`
// values; we never queue ops that use it, and the queue only copies the values to Xen.
unsafe impl Sync for PerCpuLazy {}

static LAZY: [PerCpuLazy; MAX_VCPUS] = [PerCpuLazy(spin::Mutex::new(LazyMmu::new(XenHv)))];

/// The current vCPU's lazy-MMU state. The guest runs on vCPU 0 only.
fn this_cpu() -> spin::MutexGuard<'static, LazyMmu<XenHv>> {
    LAZY[0].0.lock()
}

/// Page-table entry value as Xen sees it (machine frame + flags).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Pte(pub u64);

const FRAME_MASK: u64 = 0x000F_FFFF_FFFF_F000;

impl Pte {
    pub const NONE: Pte = Pte(0);

    /// Map machine frame `mfn` with `flags`.
    pub fn from_mfn(mfn: u64, flags: PageTableFlags) -> Pte {
        Pte((mfn << 12) & FRAME_MASK | flags.bits())
    }

    /// Map pseudo-physical frame `pfn` with `flags` (P2M translation); `None` beyond the domain.
    pub fn from_pfn(pfn: u64, flags: PageTableFlags) -> Option<Pte> {
        Some(Pte::from_mfn(xen::pfn_to_mfn(pfn)?, flags))
    }

    pub fn mfn(self) -> u64 {
        (self.0 & FRAME_MASK) >> 12
    }

    /// Pseudo-physical frame (M2P translation); `None` unless the machine frame is the domain's.
    pub fn pfn(self) -> Option<u64> {
        xen::owned_pfn(self.mfn())
    }

    pub fn flags(self) -> PageTableFlags {
        PageTableFlags::from_bits_truncate(self.0 & !FRAME_MASK)
    }

    pub fn is_present(self) -> bool {
        self.0 & PageTableFlags::PRESENT.bits() != 0
    }

    /// The same flags `steps` pseudo-physical frames further on (Linux: `pte_next_pfn`); a
    /// non-present entry stays as it is. `None` if that frame is not the domain's.
    pub fn next_pfn(self, steps: u64) -> Option<Pte> {
        if !self.is_present() {
            return Some(self);
        }
        Pte::from_pfn(self.pfn()?.checked_add(steps)?, self.flags())
    }
}

impl fmt::Debug for Pte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pte({:#x})", self.0)
    }
}

/// Kernel read-write data mapping. Xen adds USER (a PV kernel runs in ring 3) and its own bit.
pub const KERNEL_RW: PageTableFlags = PageTableFlags::from_bits_truncate(
    PageTableFlags::PRESENT.bits() | PageTableFlags::WRITABLE.bits(),
);
/// Kernel read-only mapping (page-table pages).
pub const KERNEL_RO: PageTableFlags = PageTableFlags::PRESENT;

/// Machine address of a page-table entry (what `mmu_update` takes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtePtr(pub u64);

impl PtePtr {
    /// The entry `n` slots further on.
    pub fn offset(self, n: u64) -> PtePtr {
        PtePtr(self.0 + 8 * n)
    }
}

/// A fatal misuse of the lazy-MMU API is a kernel bug, as `BUG()` is in Linux.
fn bug_on_misuse(result: Result<(), MmuError>) -> Result<(), MmuError> {
    match result {
        Err(e @ MmuError::NestedEnter { .. }) => panic!("{e}"),
        Err(e @ (MmuError::UnbalancedLeave | MmuError::UnbalancedResume)) => panic!("BUG: {e}"),
        other => other,
    }
}

/// Enter a lazy-MMU section. In `lazy=strict` mode a nested enter is a `BUG`.
pub fn enter() {
    let r = this_cpu().enter();
    let _ = bug_on_misuse(r);
}

/// Leave a lazy-MMU section: flushes (every leave does); the outermost leave stops batching.
/// An unbalanced leave is a `BUG`.
pub fn leave() -> Result<(), MmuError> {
    let r = this_cpu().leave();
    bug_on_misuse(r)
}

/// Issue what is queued.
pub fn flush() -> Result<(), MmuError> {
    this_cpu().flush()
}

/// Suspend batching (flushing first); `resume` picks it up at the same depth.
pub fn pause() -> Result<(), MmuError> {
    this_cpu().pause()
}

pub fn resume() {
    let r = this_cpu().resume();
    let _ = bug_on_misuse(r);
}

pub fn is_active() -> bool {
    this_cpu().is_active()
}

pub fn counters() -> Counters {
    this_cpu().counters()
}

/// Close any open lazy section and pause (flushing), for the test runner between tests.
/// Returns what was open, if anything.
pub fn reset_lazy_state() -> Option<alloc::string::String> {
    let mut l = this_cpu();
    let (depth, paused) = (l.depth(), l.is_paused());
    if depth == 0 && !paused {
        return None;
    }
    while l.is_paused() {
        let _ = l.resume();
    }
    while l.depth() > 0 {
        let _ = l.leave();
    }
    Some(alloc::format!("depth {depth}, paused {paused}"))
}

/// Choose the nesting model (`lazy=strict` restores the pre-fix `BUG` on nested enter).
pub fn set_strict(strict: bool) {
    this_cpu().set_strict(strict);
}

/// Run `f` with the current vCPU's lazy-MMU state (tests and the benchmark).
pub fn with_lazy<T>(f: impl FnOnce(&mut LazyMmu<XenHv>) -> T) -> T {
    f(&mut this_cpu())
}

/// A lazy-MMU section that leaves when dropped (panicking if that flush reports rejected
/// requests; use [`LazySection::leave`] to handle them).
pub struct LazySection {
    left: bool,
}

impl LazySection {
    pub fn enter() -> LazySection {
        enter();
        LazySection { left: false }
    }

    pub fn leave(mut self) -> Result<(), MmuError> {
        self.left = true;
        leave()
    }
}

impl Drop for LazySection {
    fn drop(&mut self) {
        if !self.left
            && let Err(e) = leave()
        {
            panic!("lazy MMU section ended with an error nobody handled: {e}");
        }
    }
}

/// Write one page-table entry that maps `va` (0 if not a leaf mapping): queued in lazy mode,
/// one `mmu_update` otherwise.
pub fn set_pte(ptep: PtePtr, pte: Pte, va: u64) -> Result<(), MmuError> {
    this_cpu().set_pte(ptep.0, pte.0, va)
}

/// Linux's generic `set_ptes()`: `nr` consecutive entries from `ptep` (mapping `addr` onwards),
/// the frame advancing by one page each step, inside its own lazy section.
pub fn set_ptes(addr: u64, ptep: PtePtr, pte: Pte, nr: u64) -> Result<(), MmuError> {
    // The frames must exist before anything is queued (the P2M lookups would fail mid-way). A
    // machine frame that is not the domain's has no frame number: Xen's M2P says INVALID.
    if pte.is_present() {
        let first_pfn = pte.pfn().unwrap_or(xen::INVALID_PFN);
        let nr_pages = xen::boot_info().nr_pages;
        if first_pfn >= nr_pages || nr > nr_pages - first_pfn {
            let rule = SetPtesRule::FramesBeyondDomain {
                first_pfn,
                nr,
                nr_pages,
            };
            return Err(MmuError::SetPtes(rule));
        }
    }
    // Every frame was checked above to be the domain's.
    let next = |i| pte.next_pfn(i).expect("set_ptes: frames checked").0;
    let r = this_cpu().set_ptes(addr, ptep.0, nr, next);
    bug_on_misuse(r)
}

/// Read an entry, flushing first if a queued write may change it. Any frame of the domain can
/// be read (page tables or not); a machine address outside the domain's frames is an error.
pub fn ptep_get(ptep: PtePtr) -> Result<Pte, MmError> {
    if xen::owned_pfn(ptep.0 >> 12).is_none() {
        return Err(MmError::ForeignFrame { maddr: ptep.0 });
    }
    Ok(Pte(this_cpu().read_pte(ptep.0)))
}

/// Queue (or issue) an `mmuext_op`.
pub fn mmuext(op: MmuextOp) -> Result<(), MmuError> {
    this_cpu().mmuext(op)
}

/// Invalidate this vCPU's TLB entry for `va` (rides in the batch in lazy mode).
pub fn flush_tlb_one(va: u64) -> Result<(), MmuError> {
    mmuext(mmuext_va(MMUEXT_INVLPG_LOCAL, va))
}

/// Flush this vCPU's whole TLB (rides in the batch in lazy mode).
pub fn flush_tlb_local() -> Result<(), MmuError> {
    mmuext(mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL))
}

/// Change the mapping of `va` in the current tables and invalidate it.
pub fn update_va_mapping(va: u64, pte: Pte) -> Result<(), MmuError> {
    this_cpu().update_va_mapping(va, pte.0, UVMF_INVLPG)
}
