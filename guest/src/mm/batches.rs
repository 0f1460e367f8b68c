//! What the benchmark needs beyond [`Region`]'s methods, kept inside `mm` because it builds
//! requests or batches of its own: the interface's lower bound (requests prepared beforehand,
//! issued as one hypercall) and batches of other sizes (Linux's).

use alloc::vec::Vec;

use hypercalls::XenError;
use hypercalls::abi::{DOMID_SELF, MmuUpdate, pt_update};
use hypercalls::calls::{self, batch};
use hypercalls::multicall::{self, entry_result};
use lazy_mmu::{Counters, LINUX_ENTRIES, LINUX_REQUESTS, LazyMmu, TableOp};

use super::MmError;
use super::region::{Map, Region};
use super::xen_hv::{MAX_ENTRIES, XenHv};

/// Requests for every page of a region, prepared beforehand: map (page `i` → `map(i)`) and
/// unmap. Borrowing the region keeps its entries and frames alive as long as the requests.
pub struct LowerBound<'r> {
    region: &'r Region,
    map: Vec<MmuUpdate>,
    unmap: Vec<MmuUpdate>,
    counters: Counters,
}

impl<'r> LowerBound<'r> {
    pub fn prepare(region: &'r Region, map: impl Fn(u64) -> Map) -> Result<Self, MmError> {
        let mut m = Vec::with_capacity(region.pages() as usize);
        let mut u = Vec::with_capacity(region.pages() as usize);
        for i in 0..region.pages() {
            let ptep = region.ptep(i)?;
            m.push(pt_update(ptep, region.value(map(i))?));
            u.push(pt_update(ptep, region.value(Map::None)?));
        }
        Ok(LowerBound {
            region,
            map: m,
            unmap: u,
            counters: Counters::ZERO,
        })
    }

    /// Map pages `0..n`: one `mmu_update`.
    pub fn map(&mut self, n: u64) -> Result<(), MmError> {
        let reqs = self.map.get(..n as usize).ok_or(MmError::OutOfRange {
            what: "pages",
            value: n,
            limit: self.region.pages(),
        })?;
        self.counters.hypercalls += 1;
        self.counters.requests += n;
        // SAFETY: the requests write the region's own entries with its own frames (prepared
        // from the region, which this borrows).
        unsafe { batch(reqs, DOMID_SELF) }.map_err(|e| MmError::Xen(e.error))
    }

    /// Unmap pages `0..n` and flush the TLB: one multicall of an `mmu_update` and an
    /// `mmuext_op`.
    pub fn unmap(&mut self, n: u64) -> Result<(), MmError> {
        let reqs = self.unmap.get(..n as usize).ok_or(MmError::OutOfRange {
            what: "pages",
            value: n,
            limit: self.region.pages(),
        })?;
        let flush = TableOp::TlbFlushLocal.to_mmuext();
        let mut done = [0u32; 2];
        let [d0, d1] = &mut done;
        let mut entries = [
            multicall::mmu_update_entry(reqs.as_ptr(), reqs.len() as u32, d0, DOMID_SELF),
            multicall::mmuext_op_entry(&flush, 1, d1, DOMID_SELF),
        ];
        // SAFETY: the entries point at `reqs`, `flush` and `done`, all alive across the call;
        // they clear the region's own entries.
        unsafe { calls::multicall(&mut entries) }.map_err(MmError::Xen)?;
        self.counters.hypercalls += 1;
        self.counters.multicalls += 1;
        self.counters.multicall_entries += entries.len() as u64;
        self.counters.requests += n;
        self.counters.other_ops += 1;
        match entries.iter().map(entry_result).find(|&r| r < 0) {
            Some(r) => Err(MmError::Xen(XenError::from_errno(r))),
            None => Ok(()),
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }
}

/// A lazy-MMU batch of `E` entries and `R` requests of its own (Linux's sizes: [`LinuxBatch`]).
pub struct OwnBatch<const E: usize, const R: usize>(LazyMmu<XenHv, E, R>);

/// Linux's multicall buffer: 32 entries, 32 `mmu_update` requests.
pub type LinuxBatch = OwnBatch<LINUX_ENTRIES, LINUX_REQUESTS>;

impl<const E: usize, const R: usize> OwnBatch<E, R> {
    const FITS: () = assert!(E <= MAX_ENTRIES, "larger than XenHv's marshalling buffer");

    pub fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::FITS;
        OwnBatch(LazyMmu::new(XenHv::new()))
    }

    /// In one section: page `i` of `0..n` maps `map(i)`.
    pub fn map_pages(
        &mut self,
        region: &Region,
        n: u64,
        map: impl Fn(u64) -> Map,
    ) -> Result<(), MmError> {
        check_pages(region, n)?;
        self.0.enter()?;
        for i in 0..n {
            if let Err(e) = region.set_pte_in(&mut self.0, i, map(i)) {
                let _ = self.0.leave_deferring();
                return Err(e);
            }
        }
        self.0.leave().map_err(MmError::Mmu)
    }

    /// In one section: clear pages `0..n`, then flush the TLB.
    pub fn unmap_pages(&mut self, region: &Region, n: u64) -> Result<(), MmError> {
        check_pages(region, n)?;
        self.0.enter()?;
        let mut r = Ok(());
        for i in 0..n {
            r = region.set_pte_in(&mut self.0, i, Map::None);
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() {
            r = self
                .0
                .table_op(TableOp::TlbFlushLocal)
                .map_err(MmError::Mmu);
        }
        match r {
            Ok(()) => self.0.leave().map_err(MmError::Mmu),
            Err(e) => {
                let _ = self.0.leave_deferring();
                Err(e)
            }
        }
    }

    pub fn counters(&self) -> Counters {
        self.0.counters()
    }
}

impl<const E: usize, const R: usize> Default for OwnBatch<E, R> {
    fn default() -> Self {
        Self::new()
    }
}

/// `n` pages fit in `region` (checked before anything is queued).
fn check_pages(region: &Region, n: u64) -> Result<(), MmError> {
    if n > region.pages() {
        return Err(MmError::OutOfRange {
            what: "pages",
            value: n,
            limit: region.pages(),
        });
    }
    Ok(())
}

/// Bytes of a batch of `E` entries and `R` requests (its memory cost per vCPU).
pub fn footprint<const E: usize, const R: usize>() -> usize {
    lazy_mmu::Queue::<E, R>::footprint()
}
