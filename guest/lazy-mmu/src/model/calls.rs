//! The hypercalls the model answers (`do_mmu_update`, `do_mmuext_op`, `do_update_va_mapping`,
//! `do_multicall`), as [`Hypervisor`] for the lazy-MMU core.

use super::page_types::is_guest_slot;
use super::*;

impl Model {
    /// One `MMU_NORMAL_PT_UPDATE` request (`do_mmu_update`).
    pub(super) fn update_one(&mut self, req: MmuUpdate) -> Result<(), XenError> {
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

    pub(super) fn updates(&mut self, reqs: &[MmuUpdate]) -> (Result<(), PartialFailure>, Call) {
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
    pub(super) fn mmuext_one(&mut self, op: &MmuextOp) -> Result<(), XenError> {
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

    pub(super) fn mmuext_ops(&mut self, ops: &[MmuextOp]) -> (Result<(), PartialFailure>, Call) {
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
    pub(super) fn uva(&mut self, va: u64, val: u64, flags: u64) -> (Result<(), XenError>, Call) {
        let result = self.uva_inner(va, val, flags);
        let call = Call::UpdateVaMapping {
            va,
            val,
            flags,
            result: errno(&result),
        };
        (result, call)
    }

    pub(super) fn uva_inner(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
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
