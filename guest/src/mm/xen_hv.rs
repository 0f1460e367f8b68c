//! The lazy-MMU core's [`Hypervisor`] over real hypercalls: marshals queued entries into
//! `multicall_entry`s and reads page-table entries through the kernel's mappings of the domain's
//! frames (boot mapping, direct map), or a one-page window for a frame not mapped there.

use hypercalls::abi::{DOMID_SELF, MmuUpdate, MmuextOp};
use hypercalls::multicall::{self, EMPTY_ENTRY};
use hypercalls::{PartialFailure, XenError, calls};

use super::frames;
use super::lazy::{DEFAULT_ENTRIES, Entry, EntryOutcome, Hypervisor};
use crate::xen;

/// Real Xen, for the calling domain.
pub struct XenHv;

/// Most multicall entries one flush can carry (the largest queue in use).
const MAX_ENTRIES: usize = DEFAULT_ENTRIES;

// Every hypercall below changes live page tables on behalf of `mm::pte`, the kernel's only
// page-table write path. Its contract (see that module) is Linux's: the kernel code calling it
// owns the addresses it maps and unmaps (fresh frames becoming page tables, the heap while it
// is built, test and benchmark regions), so no change pulls memory out from under a live
// reference. The safety comments below rest on that contract.
impl Hypervisor for XenHv {
    fn mmu_update(&mut self, reqs: &[MmuUpdate]) -> Result<(), PartialFailure> {
        // SAFETY: requests come from mm::pte's callers, under the contract above.
        unsafe { calls::mmu_update(reqs, DOMID_SELF) }
    }

    fn mmuext_op(&mut self, ops: &[MmuextOp]) -> Result<(), PartialFailure> {
        // SAFETY: pins and TLB flushes from mm::pte; it never switches base pointers.
        unsafe { calls::mmuext_op(ops, DOMID_SELF) }
    }

    fn update_va_mapping(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
        // SAFETY: remaps from mm::pte's callers, under the contract above.
        unsafe { calls::update_va_mapping(va, val, flags) }
    }

    fn multicall(
        &mut self,
        entries: &[Entry],
        reqs: &[MmuUpdate],
        outcomes: &mut [EntryOutcome],
    ) -> Result<(), XenError> {
        if entries.len() > MAX_ENTRIES {
            // A batch larger than this marshalling buffer: the core then issues each entry on
            // its own, which is correct, only slower.
            return Err(XenError::TooBig);
        }
        let mut calls_buf = [EMPTY_ENTRY; MAX_ENTRIES];
        let mut done = [0u32; MAX_ENTRIES];
        for (i, entry) in entries.iter().enumerate() {
            calls_buf[i] = match entry {
                Entry::MmuUpdate { first, count } => multicall::mmu_update_entry(
                    reqs[*first as usize..].as_ptr(),
                    *count as u32,
                    &mut done[i],
                    DOMID_SELF,
                ),
                Entry::Mmuext(op) => multicall::mmuext_op_entry(op, 1, &mut done[i], DOMID_SELF),
                Entry::UpdateVaMapping { va, val, flags } => {
                    multicall::update_va_mapping_entry(*va, *val, *flags)
                }
            };
        }
        let n = entries.len();
        // SAFETY: every pointer in `calls_buf` points into `reqs`, `entries` or `done`, all of
        // which outlive the call; the counts match the slices they point into; what the entries
        // change falls under the contract above.
        unsafe { calls::multicall(&mut calls_buf[..n])? };
        for i in 0..n {
            outcomes[i] = EntryOutcome {
                result: multicall::entry_result(&calls_buf[i]),
                done: done[i],
            };
        }
        Ok(())
    }

    fn read_pte(&self, ptr: u64) -> u64 {
        // `mm::pte::ptep_get` checks the frame before it gets here; anything else is a bug.
        let Some(pfn) = xen::owned_pfn(ptr >> 12) else {
            panic!("BUG: read_pte: machine address {ptr:#x} is not in a frame of this domain");
        };
        match frames::mapped_va(pfn) {
            // SAFETY: the frame is mapped there (read-write, or read-only for a page table),
            // `ptr & 0xff8` is an aligned offset inside it, and the read has no side effects.
            Some(va) => unsafe { core::ptr::read_volatile((va + (ptr & 0xff8)) as *const u64) },
            None => peek(ptr).unwrap_or_else(|e| panic!("read_pte: cannot map {ptr:#x}: {e}")),
        }
    }
}

/// The window for reading a frame that neither the boot mapping nor the direct map covers yet.
static PEEK_SLOT: xen::SharedPageSlot = xen::SharedPageSlot::new();
static PEEK_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Read the entry at machine address `ptr` of one of the domain's frames through a temporary
/// read-only mapping (two hypercalls). Public for the tests, which compare it with a direct read.
pub fn peek(ptr: u64) -> Result<u64, XenError> {
    let mfn = ptr >> 12;
    if xen::owned_pfn(mfn).is_none() {
        return Err(XenError::Inval);
    }
    let _guard = PEEK_LOCK.lock();
    // SAFETY: nothing references the slot's contents outside this lock; the frame is ours, and
    // a read-only mapping of it is allowed whatever its type (Xen checks).
    unsafe { PEEK_SLOT.map_machine_frame_ro(Some(mfn))? };
    // SAFETY: the slot maps the frame now; `ptr & 0xff8` is an aligned offset inside it.
    let value = unsafe { core::ptr::read_volatile((PEEK_SLOT.va() + (ptr & 0xff8)) as *const u64) };
    // SAFETY: as above; unmapping leaves no stale window onto the frame.
    unsafe { PEEK_SLOT.map_machine_frame_ro(None)? };
    Ok(value)
}
