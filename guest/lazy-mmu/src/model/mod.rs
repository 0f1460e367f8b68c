//! A model of Xen's PV MMU hypercalls for host tests.
//!
//! Machine memory is a set of frames (by MFN) of 512 entries each. Every frame carries Xen's type
//! information: a type (none, writable data page, L1..L4 page table), a type count and a pinned
//! bit. The rules are those of xen/arch/x86/mm.c for a 64-bit PV guest:
//!
//! * A frame's type can change only while its type count is 0 (`_get_page_type`). Taking a
//!   page-table type validates the whole table, taking a reference for every present entry
//!   (`promote_l1_table` .. `promote_l4_table`); dropping the last reference releases them again.
//! * A present+writable L1 entry takes a writable-type reference on the frame it maps, so a frame
//!   in use as a page table cannot be mapped writable (`get_page_from_l1e`: -EBUSY) and a frame
//!   mapped writable cannot become a page table (`_get_page_type`: -EINVAL).
//! * An L2/L3/L4 entry takes a reference of the next lower table type on the frame it points to
//!   (`get_page_from_l2e` .. `get_page_from_l4e`).
//! * Pins (`MMUEXT_PIN_Lx_TABLE`) hold one type reference each; a frame is pinned at most once.
//!
//! Not modelled: linear (recursive) page tables, superpages, foreign domains, grant mappings,
//! disallowed-flag masks, cache attributes, preemption. A request using them is refused.
//!
//! Every hypercall is counted by kind and logged, so tests can assert exactly which hypercalls a
//! sequence of lazy-MMU calls made.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec::Vec;

use hypercalls::abi::{
    HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, MMU_NORMAL_PT_UPDATE, MMUEXT_INVLPG_LOCAL,
    MMUEXT_PIN_L1_TABLE, MMUEXT_PIN_L4_TABLE, MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_UNPIN_TABLE,
    MmuUpdate, MmuextOp, mmuext_arg1, mmuext_mfn,
};
use hypercalls::{MachAddr, Mfn, PartialFailure, Pte, XenError};
use x86_64::VirtAddr;

use crate::hypervisor::{Batch, EntryOutcome, Hypervisor, MulticallFailure, ReadError};
use crate::request::Entry;

pub const ENTRIES: usize = 512;
pub const PAGE_SHIFT: u64 = 12;

pub const PRESENT: u64 = 1 << 0;
pub const RW: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const ACCESSED: u64 = 1 << 5;
pub const DIRTY: u64 = 1 << 6;
pub const PSE: u64 = 1 << 7;
pub const GLOBAL: u64 = 1 << 8;
/// Xen's `_PAGE_GUEST_KERNEL`: bit 12 of its 24-bit flag mask, i.e. PTE bit 52. Tells a 64-bit PV
/// kernel's mappings from user ones, since both carry `_PAGE_USER`.
pub const GUEST_KERNEL: u64 = 1 << 52;
pub const NX: u64 = 1 << 63;
/// Machine-address bits of an entry (Xen's `PADDR_MASK & PAGE_MASK`, 52-bit addresses).
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Flags a guest may change without the entry being revalidated (mm.c `FASTPATH_FLAG_WHITELIST`:
/// NX, the available bits, global, dirty, accessed, user).
const FASTPATH_WHITELIST: u64 = NX | (0x7FF << 52) | 0xE00 | GLOBAL | DIRTY | ACCESSED | USER;

/// L4 slots Xen keeps for itself in every 64-bit PV root table (`is_guest_l4_slot`): those that
/// map `HYPERVISOR_VIRT_START..HYPERVISOR_VIRT_END`.
const XEN_L4_SLOTS: core::ops::Range<usize> =
    l4_index(HYPERVISOR_VIRT_START)..l4_index(HYPERVISOR_VIRT_END);

const fn l4_index(va: u64) -> usize {
    table_index(va, 4)
}

/// Index of the entry for `va` in its table at `level` (1..=4): x86_64's `p1_index()` ..
/// `p4_index()` on a raw address (the model takes what the guest hands Xen, canonical or not).
pub const fn table_index(va: u64, level: u8) -> usize {
    ((va >> (12 + 9 * (level as u32 - 1))) & 511) as usize
}

/// The type of a frame (Xen's `PGT_*` type in `type_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageType {
    /// Never typed, or its type was dropped after a failed validation.
    None,
    /// A data page that may be mapped writable.
    Writable,
    L1,
    L2,
    L3,
    L4,
}

impl PageType {
    pub fn table(level: u8) -> PageType {
        match level {
            1 => PageType::L1,
            2 => PageType::L2,
            3 => PageType::L3,
            4 => PageType::L4,
            _ => panic!("no page-table level {level}"),
        }
    }

    pub fn level(self) -> Option<u8> {
        match self {
            PageType::L1 => Some(1),
            PageType::L2 => Some(2),
            PageType::L3 => Some(3),
            PageType::L4 => Some(4),
            PageType::None | PageType::Writable => None,
        }
    }
}

/// A frame's type information, for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    pub ty: PageType,
    /// References held on the type: pins, entries of validated tables, the root.
    pub count: u32,
    pub pinned: bool,
}

impl FrameInfo {
    /// In use as a (validated) page table of `level`?
    pub fn is_table(&self, level: u8) -> bool {
        self.count > 0 && self.ty == PageType::table(level)
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Frame {
    /// Shared until written: cloning a model (the exhaustive checker does, at every step) is cheap.
    mem: Rc<[u64; ENTRIES]>,
    ty: PageType,
    count: u32,
    pinned: bool,
}

/// One logged hypercall (inside a multicall: one entry) with what it returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// `mmu_update` of these `(ptr, val)` requests; `done` of them took effect.
    MmuUpdate {
        reqs: Vec<(u64, u64)>,
        result: i64,
        done: u32,
    },
    /// `mmuext_op` of these `(cmd, arg1)` ops.
    MmuextOp {
        ops: Vec<(u32, u64)>,
        result: i64,
        done: u32,
    },
    UpdateVaMapping {
        va: u64,
        val: u64,
        flags: u64,
        result: i64,
    },
    /// A multicall and the calls it ran (none if Xen rejected it as a whole).
    Multicall { calls: Vec<Call>, result: i64 },
}

impl Call {
    pub fn result(&self) -> i64 {
        match self {
            Call::MmuUpdate { result, .. }
            | Call::MmuextOp { result, .. }
            | Call::UpdateVaMapping { result, .. }
            | Call::Multicall { result, .. } => *result,
        }
    }

    /// `mmu_update` requests this call carried (inside a multicall: all its entries').
    pub fn requests(&self) -> Vec<(u64, u64)> {
        match self {
            Call::MmuUpdate { reqs, .. } => reqs.clone(),
            Call::Multicall { calls, .. } => calls.iter().flat_map(Call::requests).collect(),
            _ => Vec::new(),
        }
    }
}

/// Top-level hypercalls by kind (a multicall counts once, under `multicall`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCounts {
    pub mmu_update: u64,
    pub mmuext_op: u64,
    pub update_va_mapping: u64,
    pub multicall: u64,
    /// Entries run inside multicalls.
    pub multicall_entries: u64,
    /// Multicalls rejected as a whole (too many entries).
    pub rejected_multicalls: u64,
}

impl CallCounts {
    pub fn hypercalls(&self) -> u64 {
        self.mmu_update + self.mmuext_op + self.update_va_mapping + self.multicall
    }
}

/// Xen's PV MMU over simulated machine memory.
#[derive(Clone)]
pub struct Model {
    frames: BTreeMap<u64, Frame>,
    next_mfn: u64,
    /// The current root table (the vCPU's `guest_table`), which holds an L4 type reference.
    root: Option<u64>,
    /// Multicalls with more entries than this are rejected as a whole with -EINVAL, so that the
    /// caller's fallback can be tested. Real Xen has no such limit; the default is unlimited.
    pub multicall_limit: usize,
    /// Stop every multicall with -EFAULT after this many entries, as Xen does when it cannot
    /// read the next entry; the entries before it ran.
    pub multicall_fault_after: Option<usize>,
    /// Keep [`Model::log`] (the exhaustive checker turns it off for speed).
    pub logging: bool,
    pub counts: CallCounts,
    pub log: Vec<Call>,
    /// Local TLB flushes requested (`MMUEXT_TLB_FLUSH_LOCAL`, `UVMF_TLB_FLUSH`).
    pub tlb_flushes: u64,
    /// Single-page invalidations requested (`MMUEXT_INVLPG_LOCAL`, `UVMF_INVLPG`), by address.
    pub invlpgs: Vec<u64>,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    pub fn new() -> Self {
        Model {
            frames: BTreeMap::new(),
            // Away from 0 so that a zero or truncated machine address never hits a frame.
            next_mfn: 0x1000,
            root: None,
            multicall_limit: usize::MAX,
            multicall_fault_after: None,
            logging: true,
            counts: CallCounts::default(),
            log: Vec::new(),
            tlb_flushes: 0,
            invlpgs: Vec::new(),
        }
    }

    /// A fresh zeroed frame owned by the guest, untyped.
    pub fn alloc(&mut self) -> u64 {
        let mfn = self.next_mfn;
        self.next_mfn += 1;
        self.frames.insert(
            mfn,
            Frame {
                mem: Rc::new([0; ENTRIES]),
                ty: PageType::None,
                count: 0,
                pinned: false,
            },
        );
        mfn
    }

    /// Write a frame directly, as the domain builder does before the tables are in use. Only for
    /// frames not in use as a page table: Xen never lets a guest write those without validation.
    pub fn poke(&mut self, mfn: u64, index: usize, val: u64) {
        let f = self.frames.get_mut(&mfn).expect("poke of a missing frame");
        assert!(
            f.count == 0 || f.ty.level().is_none(),
            "poke into frame {mfn:#x}, in use as {:?}",
            f.ty
        );
        Rc::make_mut(&mut f.mem)[index] = val;
    }

    /// The entry `index` of frame `mfn`.
    pub fn entry(&self, mfn: u64, index: usize) -> u64 {
        self.frames[&mfn].mem[index]
    }

    /// Same frames, contents, types and root as `other` (the tables a guest could observe)?
    pub fn same_tables(&self, other: &Model) -> bool {
        self.frames == other.frames && self.root == other.root
    }

    /// Every frame's number, type, count and pin, appended to `out` (a compact key of the type
    /// state for the exhaustive checker).
    pub fn type_digest(&self, out: &mut Vec<u64>) {
        for (mfn, f) in &self.frames {
            let ty = f.ty.level().map_or(0, u64::from) | if f.ty == PageType::None { 0 } else { 8 };
            out.push(mfn << 16 | ty << 8 | u64::from(f.pinned));
            out.push(u64::from(f.count));
        }
    }

    pub fn frame_info(&self, mfn: u64) -> Option<FrameInfo> {
        self.frames.get(&mfn).map(|f| FrameInfo {
            ty: f.ty,
            count: f.count,
            pinned: f.pinned,
        })
    }

    /// Make `mfn` the vCPU's root table (as `MMUEXT_NEW_BASEPTR` does), taking an L4 type
    /// reference on it and dropping the old root's. Not logged: it is set-up, not under test.
    pub fn set_root(&mut self, mfn: u64) -> Result<(), XenError> {
        if !self.frames.contains_key(&mfn) {
            return Err(XenError::Inval);
        }
        self.get_page_type(mfn, PageType::L4)?;
        if let Some(old) = self.root.replace(mfn) {
            self.put_page_type(old);
        }
        Ok(())
    }

    /// Forget the counts and the log (e.g. after building the address space).
    pub fn reset_stats(&mut self) {
        self.counts = CallCounts::default();
        self.log.clear();
        self.tlb_flushes = 0;
        self.invlpgs.clear();
    }

    /// Build a pinned address space: an L4 (the root) -> one L3 -> one L2 -> `l1_tables` L1
    /// tables, all empty, mapping `Space::BASE_VA` onwards; plus `data_frames` data frames.
    /// The tables are pinned through the hypercall (which validates them); the counts and log
    /// are reset afterwards.
    pub fn build_space(&mut self, l1_tables: usize, data_frames: usize) -> Space {
        assert!((1..=ENTRIES).contains(&l1_tables));
        let table_flags = PRESENT | RW | USER | ACCESSED;
        let (l4, l3, l2) = (self.alloc(), self.alloc(), self.alloc());
        let base = Space::BASE_VA;
        self.poke(l4, l4_index(base), l3 << PAGE_SHIFT | table_flags);
        self.poke(l3, table_index(base, 3), l2 << PAGE_SHIFT | table_flags);
        let l1s: Vec<u64> = (0..l1_tables).map(|_| self.alloc()).collect();
        for (i, l1) in l1s.iter().enumerate() {
            self.poke(l2, table_index(base, 2) + i, l1 << PAGE_SHIFT | table_flags);
        }
        let data = (0..data_frames).map(|_| self.alloc()).collect();
        self.mmuext_op(&[mmuext_mfn(MMUEXT_PIN_L4_TABLE, mfn(l4))])
            .expect("pinning the new address space");
        self.set_root(l4).expect("loading the new root");
        self.reset_stats();
        Space {
            l4,
            l3,
            l2,
            l1s,
            data,
        }
    }

    /// The value Xen stores for an entry written at `level` (mm.h `adjust_guest_l1e` ..
    /// `adjust_guest_l4e` for a 64-bit PV guest): a PV kernel runs in ring 3, so its mappings
    /// get `_PAGE_USER`; L1 entries tell kernel from user mappings by `_PAGE_GUEST_KERNEL` and
    /// user mappings become global; L4 entries are always marked accessed.
    pub fn adjust(level: u8, val: u64) -> u64 {
        if val & PRESENT == 0 {
            return val;
        }
        match level {
            1 => {
                let mut val = val;
                if val & USER == 0 {
                    val |= GUEST_KERNEL | USER;
                }
                if val & GUEST_KERNEL == 0 {
                    val |= GLOBAL | USER;
                }
                val
            }
            2 | 3 => val | USER,
            _ => val | ACCESSED | USER,
        }
    }
}

/// An address space built by [`Model::build_space`]: slot `s` is entry `s % 512` of L1 table
/// `s / 512`, mapping `BASE_VA + s * 4096`.
#[derive(Clone, Debug)]
pub struct Space {
    pub l4: u64,
    pub l3: u64,
    pub l2: u64,
    pub l1s: Vec<u64>,
    pub data: Vec<u64>,
}

impl Space {
    /// L4 slot 1: a guest slot, and 2 MiB aligned so that slot indices match table indices.
    pub const BASE_VA: u64 = 1 << 39;
    /// Flags of a data mapping, as Xen stores them for a PV kernel (see [`Model::adjust`]).
    pub const DATA_FLAGS: u64 = PRESENT | RW | USER | ACCESSED | DIRTY | GUEST_KERNEL;

    pub fn slots(&self) -> usize {
        self.l1s.len() * ENTRIES
    }

    /// The entry value mapping machine frame `mfn` with `flags`.
    pub fn pte(mfn: u64, flags: u64) -> u64 {
        mfn << PAGE_SHIFT | flags
    }
}

/// A model frame number as a machine frame (model frames are numbered from 0x1000 up).
pub fn mfn(n: u64) -> Mfn {
    Mfn::new(n).expect("model frame numbers are small")
}

mod calls;
mod page_types;

#[cfg(test)]
mod tests;
