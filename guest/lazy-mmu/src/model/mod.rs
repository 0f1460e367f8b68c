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
use crate::program::Layout;
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

    // ---- Xen's type system (mm.c) ----

    fn exists(&self, mfn: u64) -> bool {
        self.frames.contains_key(&mfn)
    }

    fn frame(&mut self, mfn: u64) -> &mut Frame {
        self.frames.get_mut(&mfn).expect("frame exists")
    }

    /// `_get_page_type`: take a reference of type `ty`, changing and validating the type if no
    /// reference is held.
    fn get_page_type(&mut self, mfn: u64, ty: PageType) -> Result<(), XenError> {
        let f = self.frame(mfn);
        if f.count > 0 {
            if f.ty != ty {
                return Err(XenError::Inval);
            }
            f.count += 1;
            return Ok(());
        }
        // The new type is in place (count 1, not yet validated) while the entries are checked,
        // so a table cannot validate through a reference to itself.
        f.ty = ty;
        f.count = 1;
        if let Some(level) = ty.level()
            && let Err(e) = self.promote(mfn, level)
        {
            // validate_page: a failed validation leaves the frame untyped.
            let f = self.frame(mfn);
            f.ty = PageType::None;
            f.count = 0;
            return Err(e);
        }
        Ok(())
    }

    /// `put_page_type`: drop a type reference; the last one of a page table releases the
    /// references its entries hold (`free_page_type`).
    fn put_page_type(&mut self, mfn: u64) {
        let f = self.frame(mfn);
        assert!(f.count > 0, "type count underflow on frame {mfn:#x}");
        f.count -= 1;
        if f.count == 0
            && let Some(level) = f.ty.level()
        {
            let mem = *f.mem;
            for (i, e) in mem.iter().enumerate() {
                if is_guest_slot(level, i) {
                    self.put_entry_ref(level, *e);
                }
            }
        }
    }

    /// `promote_lN_table`: take the references of every entry; undo them all on failure.
    fn promote(&mut self, mfn: u64, level: u8) -> Result<(), XenError> {
        let mem = *self.frame(mfn).mem;
        for (i, e) in mem.iter().enumerate() {
            if !is_guest_slot(level, i) {
                continue;
            }
            if let Err(err) = self.get_entry_ref(level, *e) {
                for j in (0..i).rev() {
                    if is_guest_slot(level, j) {
                        self.put_entry_ref(level, mem[j]);
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// `get_page_from_lNe`: the reference a present entry at `level` holds.
    fn get_entry_ref(&mut self, level: u8, e: u64) -> Result<(), XenError> {
        if e & PRESENT == 0 {
            return Ok(());
        }
        let target = (e & ADDR_MASK) >> PAGE_SHIFT;
        if level == 1 {
            if !self.exists(target) {
                // Not guest RAM: a non-privileged attempt to map MMIO space.
                return Err(XenError::Perm);
            }
            if e & RW != 0 {
                // A frame in use as a page table (or otherwise typed) cannot be mapped writable.
                return self
                    .get_page_type(target, PageType::Writable)
                    .map_err(|_| XenError::Busy);
            }
            return Ok(());
        }
        if e & PSE != 0 || !self.exists(target) {
            // No superpages here; a frame the guest does not own cannot be a table.
            return Err(XenError::Inval);
        }
        self.get_page_type(target, PageType::table(level - 1))
    }

    /// `put_page_from_lNe`.
    fn put_entry_ref(&mut self, level: u8, e: u64) {
        if e & PRESENT == 0 || (level == 1 && e & RW == 0) {
            return;
        }
        self.put_page_type((e & ADDR_MASK) >> PAGE_SHIFT);
    }

    /// `mod_lN_entry`: write entry `index` of validated table `mfn`.
    fn mod_entry(&mut self, mfn: u64, level: u8, index: usize, new: u64) -> Result<(), XenError> {
        if !is_guest_slot(level, index) {
            return Err(XenError::Inval);
        }
        let old = self.frame(mfn).mem[index];
        if new & PRESENT != 0 {
            // Same frame, same permissions: only whitelisted flags change, nothing to revalidate.
            let fast = old & PRESENT != 0 && (old ^ new) & !FASTPATH_WHITELIST == 0;
            if !fast {
                self.get_entry_ref(level, new)?;
            }
            Rc::make_mut(&mut self.frame(mfn).mem)[index] = Model::adjust(level, new);
            if fast {
                return Ok(());
            }
        } else {
            Rc::make_mut(&mut self.frame(mfn).mem)[index] = new;
        }
        self.put_entry_ref(level, old);
        Ok(())
    }

    // ---- The hypercalls ----

    /// One `MMU_NORMAL_PT_UPDATE` request (`do_mmu_update`).
    fn update_one(&mut self, req: MmuUpdate) -> Result<(), XenError> {
        let cmd = req.ptr & 7;
        if cmd != MMU_NORMAL_PT_UPDATE as u64 {
            // The other commands are not modelled; Xen refuses unknown ones with -ENOSYS.
            return Err(XenError::NoSys);
        }
        let ptr = req.ptr - cmd;
        let mfn = ptr >> PAGE_SHIFT;
        let index = ((ptr & 0xFFF) >> 3) as usize;
        let Some(f) = self.frames.get(&mfn) else {
            // get_page_from_gfn: not a frame of this guest.
            return Err(XenError::Inval);
        };
        match f.ty.level() {
            Some(level) if f.count > 0 => self.mod_entry(mfn, level, index, req.val),
            _ => {
                // Not a page table in use: Xen takes a writable type reference and writes the
                // value as plain data (the PGT_writable_page case of do_mmu_update).
                self.get_page_type(mfn, PageType::Writable)?;
                Rc::make_mut(&mut self.frame(mfn).mem)[index] = req.val;
                self.put_page_type(mfn);
                Ok(())
            }
        }
    }

    fn updates(&mut self, reqs: &[MmuUpdate]) -> (Result<(), PartialFailure>, Call) {
        let mut result = Ok(());
        for (i, req) in reqs.iter().enumerate() {
            if let Err(error) = self.update_one(*req) {
                result = Err(PartialFailure {
                    done: i as u32,
                    error,
                });
                break;
            }
        }
        let call = Call::MmuUpdate {
            reqs: reqs.iter().map(|r| (r.ptr, r.val)).collect(),
            result: errno(&result.map_err(|e| e.error)),
            done: done_of(&result, reqs.len()),
        };
        (result, call)
    }

    /// One `mmuext_op` (`do_mmuext_op`).
    fn mmuext_one(&mut self, op: &MmuextOp) -> Result<(), XenError> {
        let arg = mmuext_arg1(op);
        match op.cmd {
            MMUEXT_PIN_L1_TABLE..=MMUEXT_PIN_L4_TABLE => {
                let level = (op.cmd - MMUEXT_PIN_L1_TABLE + 1) as u8;
                if !self.exists(arg) {
                    return Err(XenError::Inval);
                }
                self.get_page_type(arg, PageType::table(level))?;
                if self.frame(arg).pinned {
                    // "mfn already pinned": pins do not nest.
                    self.put_page_type(arg);
                    return Err(XenError::Inval);
                }
                self.frame(arg).pinned = true;
                Ok(())
            }
            MMUEXT_UNPIN_TABLE => {
                if !self.exists(arg) || !self.frame(arg).pinned {
                    return Err(XenError::Inval);
                }
                self.frame(arg).pinned = false;
                self.put_page_type(arg);
                Ok(())
            }
            MMUEXT_TLB_FLUSH_LOCAL => {
                self.tlb_flushes += 1;
                Ok(())
            }
            MMUEXT_INVLPG_LOCAL => {
                self.invlpgs.push(arg);
                Ok(())
            }
            _ => Err(XenError::NoSys),
        }
    }

    fn mmuext_ops(&mut self, ops: &[MmuextOp]) -> (Result<(), PartialFailure>, Call) {
        let mut result = Ok(());
        for (i, op) in ops.iter().enumerate() {
            if let Err(error) = self.mmuext_one(op) {
                result = Err(PartialFailure {
                    done: i as u32,
                    error,
                });
                break;
            }
        }
        let call = Call::MmuextOp {
            ops: ops.iter().map(|o| (o.cmd, mmuext_arg1(o))).collect(),
            result: errno(&result.map_err(|e| e.error)),
            done: done_of(&result, ops.len()),
        };
        (result, call)
    }

    /// `do_update_va_mapping`: find the L1 entry for `va` through the current root and update it
    /// like `mmu_update` would, then flush as `flags` asks.
    fn uva(&mut self, va: u64, val: u64, flags: u64) -> (Result<(), XenError>, Call) {
        let result = self.uva_inner(va, val, flags);
        let call = Call::UpdateVaMapping {
            va,
            val,
            flags,
            result: errno(&result),
        };
        (result, call)
    }

    fn uva_inner(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
        let canonical = ((va as i64) << 16 >> 16) as u64 == va;
        if !canonical || (HYPERVISOR_VIRT_START..HYPERVISOR_VIRT_END).contains(&va) {
            return Err(XenError::Inval);
        }
        let mut table = self.root.ok_or(XenError::Inval)?;
        for level in [4u8, 3, 2] {
            let e = self.frames[&table].mem[table_index(va, level)];
            if e & PRESENT == 0 || e & PSE != 0 {
                // map_guest_l1e finds no L1 table.
                return Err(XenError::Inval);
            }
            table = (e & ADDR_MASK) >> PAGE_SHIFT;
        }
        if !self.frame_info(table).is_some_and(|f| f.is_table(1)) {
            return Err(XenError::Inval);
        }
        self.mod_entry(table, 1, table_index(va, 1), val)?;
        // UVMF_FLUSHTYPE_MASK: 1 = flush the TLB, 2 = invalidate the one page.
        match flags & 3 {
            1 => self.tlb_flushes += 1,
            2 => self.invlpgs.push(va),
            _ => {}
        }
        Ok(())
    }

    /// Check every type count against the references that should exist: pins, the root, and
    /// the entries of validated tables. Panics with the first discrepancy.
    pub fn check_refcounts(&self) {
        let mut expected: BTreeMap<u64, (u32, Option<PageType>)> = BTreeMap::new();
        let mut add = |mfn: u64, ty: PageType| {
            let e = expected.entry(mfn).or_insert((0, None));
            e.0 += 1;
            assert!(
                e.1.is_none_or(|t| t == ty),
                "frame {mfn:#x} referenced as {:?} and {ty:?}",
                e.1
            );
            e.1 = Some(ty);
        };
        for (&mfn, f) in &self.frames {
            if f.pinned {
                add(mfn, f.ty);
            }
            if self.root == Some(mfn) {
                add(mfn, PageType::L4);
            }
            let Some(level) = f.ty.level() else { continue };
            if f.count == 0 {
                continue;
            }
            for (i, e) in f.mem.iter().enumerate() {
                if !is_guest_slot(level, i) || e & PRESENT == 0 {
                    continue;
                }
                let target = (e & ADDR_MASK) >> PAGE_SHIFT;
                match level {
                    1 if e & RW != 0 => add(target, PageType::Writable),
                    1 => {}
                    _ => add(target, PageType::table(level - 1)),
                }
            }
        }
        for (&mfn, f) in &self.frames {
            let (count, ty) = expected.get(&mfn).copied().unwrap_or((0, None));
            assert_eq!(f.count, count, "type count of frame {mfn:#x} ({:?})", f.ty);
            if let Some(ty) = ty {
                assert_eq!(f.ty, ty, "type of frame {mfn:#x}");
            }
        }
    }
}

/// A model frame number as a machine frame (model frames are numbered from 0x1000 up).
pub fn mfn(n: u64) -> Mfn {
    Mfn::new(n).expect("model frame numbers are small")
}

/// Slots a guest may write at `level`: all but Xen's own L4 slots.
fn is_guest_slot(level: u8, index: usize) -> bool {
    level != 4 || !XEN_L4_SLOTS.contains(&index)
}

fn errno(result: &Result<(), XenError>) -> i64 {
    match result {
        Ok(()) => 0,
        Err(e) => e.errno(),
    }
}

fn done_of(result: &Result<(), PartialFailure>, n: usize) -> u32 {
    match result {
        Ok(()) => n as u32,
        Err(e) => e.done,
    }
}

impl Model {
    fn record(&mut self, call: Call) {
        if self.logging {
            self.log.push(call);
        }
    }
}

impl Hypervisor for Model {
    fn mmu_update(&mut self, reqs: &[MmuUpdate]) -> Result<(), PartialFailure> {
        self.counts.mmu_update += 1;
        let (result, call) = self.updates(reqs);
        self.record(call);
        result
    }

    fn mmuext_op(&mut self, ops: &[MmuextOp]) -> Result<(), PartialFailure> {
        self.counts.mmuext_op += 1;
        let (result, call) = self.mmuext_ops(ops);
        self.record(call);
        result
    }

    fn update_va_mapping(&mut self, va: VirtAddr, val: Pte, flags: u64) -> Result<(), XenError> {
        self.counts.update_va_mapping += 1;
        let (result, call) = self.uva(va.as_u64(), val.raw(), flags);
        self.record(call);
        result
    }

    fn multicall(
        &mut self,
        batch: Batch<'_>,
        outcomes: &mut [EntryOutcome],
    ) -> Result<(), MulticallFailure> {
        self.counts.multicall += 1;
        if batch.entries.len() > self.multicall_limit {
            self.counts.rejected_multicalls += 1;
            self.record(Call::Multicall {
                calls: Vec::new(),
                result: XenError::Inval.errno(),
            });
            return Err(MulticallFailure {
                ran: 0,
                error: XenError::Inval,
            });
        }
        let runs = self
            .multicall_fault_after
            .map_or(batch.entries.len(), |n| n.min(batch.entries.len()));
        // do_multicall runs every entry whatever the others returned, and stores each result.
        let mut calls = Vec::new();
        for (entry, outcome) in batch.entries.iter().zip(outcomes.iter_mut()).take(runs) {
            let call = match *entry {
                Entry::Updates { first, count } => {
                    let range = first as usize..first as usize + count as usize;
                    self.updates(&batch.reqs[range]).1
                }
                Entry::TableOps { first, count } => {
                    let range = first as usize..first as usize + count as usize;
                    self.mmuext_ops(&batch.ops[range]).1
                }
                Entry::UpdateVaMapping { va, val, flags } => {
                    self.uva(va.as_u64(), val.raw(), flags).1
                }
            };
            *outcome = EntryOutcome {
                result: call.result(),
                done: match &call {
                    Call::MmuUpdate { done, .. } | Call::MmuextOp { done, .. } => *done,
                    _ => 0,
                },
            };
            if self.logging {
                calls.push(call);
            }
        }
        self.counts.multicall_entries += runs as u64;
        if runs < batch.entries.len() {
            self.record(Call::Multicall {
                calls,
                result: XenError::Fault.errno(),
            });
            return Err(MulticallFailure {
                ran: runs,
                error: XenError::Fault,
            });
        }
        self.record(Call::Multicall { calls, result: 0 });
        Ok(())
    }

    fn read_pte(&self, ptr: MachAddr) -> Result<Pte, ReadError> {
        let f = self.frames.get(&ptr.mfn().get()).ok_or(ReadError { ptr })?;
        Ok(Pte::from_raw(f.mem[ptr.entry_index() as usize]))
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

impl Layout for Space {
    fn pte_ptr(&self, slot: usize) -> MachAddr {
        MachAddr::new_truncate(
            self.l1s[slot / ENTRIES] << PAGE_SHIFT | ((slot % ENTRIES) as u64 * 8),
        )
    }

    fn va(&self, slot: usize) -> VirtAddr {
        VirtAddr::new_truncate(Space::BASE_VA + slot as u64 * 4096)
    }

    fn pte_value(&self, frame: usize) -> Pte {
        Pte::from_raw(Space::pte(self.data[frame], Space::DATA_FLAGS))
    }

    /// A writable mapping of the first L1 table, which stays in use as one (-EBUSY).
    fn bad_value(&self) -> Pte {
        Pte::from_raw(Space::pte(self.l1s[0], Space::DATA_FLAGS))
    }
}

#[cfg(test)]
mod tests;
