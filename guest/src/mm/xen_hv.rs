//! The lazy-MMU core's [`Hypervisor`] over real hypercalls: marshals queued entries into
//! `multicall_entry`s and reads page-table entries through the kernel's linear map.

use hypercalls::abi::{DOMID_SELF, MmuUpdate, MmuextOp};
use hypercalls::multicall::{self, EMPTY_ENTRY};
use hypercalls::{PartialFailure, XenError, calls};

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
        let pfn = xen::mfn_to_pfn(ptr >> 12);
        let nr_pages = xen::boot_info().nr_pages;
        assert!(
            pfn < nr_pages,
            "read_pte: machine address {ptr:#x} is not in a frame of this domain (pfn {pfn:#x})"
        );
        let va = xen::pfn_to_va(pfn) + (ptr & 0xff8);
        // SAFETY: page-table frames are in the linear map (boot tables in the boot area, new
        // ones come from the frame allocator), mapped read-only; the read has no side effects.
        unsafe { core::ptr::read_volatile(va as *const u64) }
    }
}
