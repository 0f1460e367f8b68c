//! The little address space every program runs in, and the reference's one-request-at-a-time
//! execution.

use alloc::vec::Vec;

use hypercalls::abi::pt_update;
use hypercalls::{MachAddr, Pte, XenError};
use x86_64::VirtAddr;

use super::Sym;
use crate::hypervisor::Hypervisor;
use crate::model::{ACCESSED, Model, PRESENT, RW, Space, USER, mfn, table_index};
use crate::program::Layout;
use crate::request::{Request, TableLevel, TableOp};

/// The little address space every program runs in.
#[derive(Clone)]
pub(crate) struct World {
    space: Space,
    spare: u64,
    pub(crate) hook_ptr: MachAddr,
}

impl World {
    pub(crate) fn new(model: &mut Model) -> World {
        let space = model.build_space(1, 4);
        let spare = model.alloc();
        let after_spare = model.alloc();
        assert_eq!(
            after_spare,
            spare + 1,
            "the model hands out consecutive frames"
        );
        // The L2 entry after the one holding the space's L1 table.
        let l2_index = table_index(Space::BASE_VA, 2) as u64 + 1;
        let hook_ptr = MachAddr::new_truncate((space.l2 << 12) + l2_index * 8);
        model.reset_stats();
        World {
            space,
            spare,
            hook_ptr,
        }
    }

    pub(crate) fn data(&self, i: usize) -> Pte {
        self.space.pte_value(i)
    }

    pub(crate) fn spare_writable(&self) -> Pte {
        Pte::from_raw(Space::pte(self.spare, Space::DATA_FLAGS))
    }

    fn spare_as_table(&self) -> Pte {
        Pte::from_raw(Space::pte(self.spare, PRESENT | RW | USER | ACCESSED))
    }

    pub(crate) fn slot(&self, s: usize) -> (MachAddr, VirtAddr) {
        (self.space.pte_ptr(s), self.space.va(s))
    }

    /// The requests `sym` makes, in order (empty for calls that make none).
    pub(crate) fn requests(&self, sym: Sym) -> Vec<Request> {
        let set = |s: usize, val: Pte| {
            let (ptr, va) = self.slot(s);
            Request::SetPte { ptr, val, va }
        };
        let f = mfn(self.spare);
        match sym {
            Sym::SetA => [set(0, self.data(0))].to_vec(),
            Sym::SetB => [set(1, self.data(1))].to_vec(),
            Sym::Bad => [set(0, self.space.bad_value())].to_vec(),
            Sym::SetPtes2 => {
                let first = self.spare_writable();
                [set(0, first), set(1, first.with_mfn(mfn(self.spare + 1)))].to_vec()
            }
            Sym::MapF => [set(1, self.spare_writable())].to_vec(),
            Sym::Invlpg => [Request::TableOp(TableOp::InvlpgLocal(self.slot(0).1))].to_vec(),
            Sym::Hook => [Request::SetTableEntry {
                ptr: self.hook_ptr,
                val: self.spare_as_table(),
            }]
            .to_vec(),
            Sym::Pin => [Request::TableOp(TableOp::Pin(TableLevel::L1, f))].to_vec(),
            Sym::Unpin => [Request::TableOp(TableOp::Unpin(f))].to_vec(),
            _ => Vec::new(),
        }
    }
}

/// Issue one request at once (the reference).
pub(crate) fn issue(model: &mut Model, request: Request) -> Result<(), XenError> {
    match request {
        Request::SetPte { ptr, val, .. } | Request::SetTableEntry { ptr, val } => model
            .mmu_update(&[pt_update(ptr, val)])
            .map_err(|e| e.error),
        Request::TableOp(op) => model.mmuext_op(&[op.to_mmuext()]).map_err(|e| e.error),
        Request::UpdateVaMapping { va, val, flags } => model.update_va_mapping(va, val, flags),
    }
}
