//! Xen's page-type rules (xen/arch/x86/mm.c): type references, validation of tables on their
//! first table-type reference, and the references each entry holds.

use super::*;

impl Model {
    pub(super) fn exists(&self, mfn: u64) -> bool {
        self.frames.contains_key(&mfn)
    }

    pub(super) fn frame(&mut self, mfn: u64) -> &mut Frame {
        self.frames.get_mut(&mfn).expect("frame exists")
    }

    /// `_get_page_type`: take a reference of type `ty`, changing and validating the type if no
    /// reference is held.
    pub(super) fn get_page_type(&mut self, mfn: u64, ty: PageType) -> Result<(), XenError> {
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
    pub(super) fn put_page_type(&mut self, mfn: u64) {
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
    pub(super) fn promote(&mut self, mfn: u64, level: u8) -> Result<(), XenError> {
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
    pub(super) fn get_entry_ref(&mut self, level: u8, e: u64) -> Result<(), XenError> {
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
    pub(super) fn put_entry_ref(&mut self, level: u8, e: u64) {
        if e & PRESENT == 0 || (level == 1 && e & RW == 0) {
            return;
        }
        self.put_page_type((e & ADDR_MASK) >> PAGE_SHIFT);
    }

    /// `mod_lN_entry`: write entry `index` of validated table `mfn`.
    pub(super) fn mod_entry(
        &mut self,
        mfn: u64,
        level: u8,
        index: usize,
        new: u64,
    ) -> Result<(), XenError> {
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
}

/// Slots a guest may write at `level`: all but Xen's own L4 slots.
pub(super) fn is_guest_slot(level: u8, index: usize) -> bool {
    level != 4 || !XEN_L4_SLOTS.contains(&index)
}
