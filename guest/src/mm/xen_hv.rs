//! The lazy-MMU core's [`Hypervisor`] over real hypercalls: marshals a queued batch into
//! `multicall_entry`s, and reads page-table entries through the kernel's mappings of the
//! domain's frames (boot mapping, direct map) or a one-page window for a frame not mapped there.
//!
//! Private to `mm`: [`XenHv`] can only be built here, so every request it issues comes through
//! `mm::pte` (whose functions carry the contract) or an owned `mm::region::Region`.

use hypercalls::abi::{DOMID_SELF, MmuUpdate, MmuextOp};
use hypercalls::calls::{self, batch};
use hypercalls::multicall::{self, EMPTY_ENTRY, MulticallEntry};
use hypercalls::{MachAddr, PartialFailure, Pte, XenError};
use lazy_mmu::{
    Batch, DEFAULT_ENTRIES, Entry, EntryOutcome, Hypervisor, MulticallFailure, ReadError,
};
use x86_64::VirtAddr;

use super::frames;
use crate::xen::p2m;
use crate::xen::shared::PEEK_SLOT;

/// Real Xen, for the calling domain. Only `mm` can make one (the field is private).
pub struct XenHv(());

impl XenHv {
    pub(super) const fn new() -> XenHv {
        XenHv(())
    }
}

/// Most multicall entries one flush carries: the largest queue in use (the per-vCPU batch;
/// Linux's and the stress test's tiny one are smaller). Checked where the queues are built.
pub(super) const MAX_ENTRIES: usize = DEFAULT_ENTRIES;

// Every request below comes from a `LazyMmu<XenHv>`, which only `mm` builds; its callers are
// `mm::pte`'s unsafe functions (whose callers promise the change is sound), the safe TLB
// operations, and `Region`, which writes only entries of its own reserved range. So no request
// pulls memory out from under a live reference. The safety comments below rest on that.
impl Hypervisor for XenHv {
    fn mmu_update(&mut self, reqs: &[MmuUpdate]) -> Result<(), PartialFailure> {
        // SAFETY: requests from mm's callers, under the contract above.
        unsafe { batch(reqs, DOMID_SELF) }
    }

    fn mmuext_op(&mut self, ops: &[MmuextOp]) -> Result<(), PartialFailure> {
        // SAFETY: TLB operations, pins and unpins (`TableOp` has no base-pointer switch).
        unsafe { batch(ops, DOMID_SELF) }
    }

    fn update_va_mapping(&mut self, va: VirtAddr, val: Pte, flags: u64) -> Result<(), XenError> {
        // SAFETY: remaps from mm's callers, under the contract above.
        unsafe { calls::update_va_mapping(va, val, flags) }
    }

    fn multicall(
        &mut self,
        batch: Batch<'_>,
        outcomes: &mut [EntryOutcome],
    ) -> Result<(), MulticallFailure> {
        let n = batch.entries.len();
        if n > MAX_ENTRIES || outcomes.len() < n {
            // Cannot happen: every queue mm builds has at most MAX_ENTRIES entries.
            return Err(MulticallFailure {
                ran: 0,
                error: XenError::TooBig,
            });
        }
        let mut calls_buf = [EMPTY_ENTRY; MAX_ENTRIES];
        let mut done = [0u32; MAX_ENTRIES];
        for (i, entry) in batch.entries.iter().enumerate() {
            // Each entry's `result` starts as `multicall::NOT_RUN`, which Xen never writes.
            calls_buf[i] = marshal(entry, &batch, &mut done[i]);
        }
        // SAFETY: every pointer in `calls_buf` points into `batch.reqs`, `batch.ops` or `done`,
        // all of which outlive the call, with counts inside those slices (`marshal`); what the
        // entries change falls under the contract above.
        let ran = match unsafe { calls::multicall(&mut calls_buf[..n]) } {
            Ok(()) => Ok(()),
            // Xen runs the entries in order and writes each result: those it did not write did
            // not run.
            Err(error) => Err(MulticallFailure {
                ran: calls_buf[..n]
                    .iter()
                    .take_while(|e| multicall::has_run(e))
                    .count(),
                error,
            }),
        };
        for i in 0..n {
            if multicall::has_run(&calls_buf[i]) {
                outcomes[i] = EntryOutcome {
                    result: multicall::entry_result(&calls_buf[i]),
                    done: done[i],
                };
            }
        }
        ran
    }

    fn read_pte(&self, ptr: MachAddr) -> Result<Pte, ReadError> {
        let Some(pfn) = p2m::owned_pfn(ptr.mfn()) else {
            return Err(ReadError { ptr });
        };
        let offset = ptr.page_offset() & !7;
        match frames::mapped_va(pfn) {
            // SAFETY: the frame is mapped there (read-write, or read-only for a page table),
            // `offset` is an aligned offset inside it, and the read has no side effects.
            Some(va) => Ok(Pte::from_raw(unsafe {
                core::ptr::read_volatile((va + offset) as *const u64)
            })),
            None => peek(ptr).map_err(|_| ReadError { ptr }),
        }
    }
}

/// One queued entry as a `multicall_entry`, with its `pdone` in `done`.
fn marshal(entry: &Entry, batch: &Batch<'_>, done: &mut u32) -> MulticallEntry {
    match *entry {
        Entry::Updates { first, count } => {
            let reqs = &batch.reqs[first as usize..first as usize + count as usize];
            multicall::mmu_update_entry(reqs.as_ptr(), reqs.len() as u32, done, DOMID_SELF)
        }
        Entry::TableOps { first, count } => {
            let ops = &batch.ops[first as usize..first as usize + count as usize];
            multicall::mmuext_op_entry(ops.as_ptr(), ops.len() as u32, done, DOMID_SELF)
        }
        Entry::UpdateVaMapping { va, val, flags } => {
            multicall::update_va_mapping_entry(va.as_u64(), val.raw(), flags)
        }
    }
}

static PEEK_LOCK: crate::xen::events::IrqMutex<()> = crate::xen::events::IrqMutex::new(());

/// Read the entry at machine address `ptr` of one of the domain's frames through a temporary
/// read-only mapping (two hypercalls). Public for the tests, which compare it with
/// `ptep_get`.
pub fn peek(ptr: MachAddr) -> Result<Pte, XenError> {
    let mfn = ptr.mfn();
    if p2m::owned_pfn(mfn).is_none() {
        return Err(XenError::Inval);
    }
    let _guard = PEEK_LOCK.lock();
    // SAFETY: nothing references the slot's contents outside this lock; the frame is ours, and
    // a read-only mapping of it is allowed whatever its type (Xen checks).
    unsafe { PEEK_SLOT.map_machine_frame_ro(Some(mfn))? };
    let at = PEEK_SLOT.va() + (ptr.page_offset() & !7);
    // SAFETY: the slot maps the frame now; `at` is an aligned offset inside it.
    let value = unsafe { core::ptr::read_volatile(at as *const u64) };
    // SAFETY: as above; the slot maps its own image frame again (no stale window onto the
    // frame, and no static of the image left unmapped).
    unsafe { PEEK_SLOT.map_machine_frame_ro(None)? };
    Ok(Pte::from_raw(value))
}
