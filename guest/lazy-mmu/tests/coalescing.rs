//! The batch: coalescing into entries, single-entry flushes, full buffers, read hazards, and
//! the flush before a request that changes page types.

mod common;

use common::*;
use hypercalls::abi::{
    MMUEXT_INVLPG_LOCAL, MMUEXT_PIN_L1_TABLE, MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_UNPIN_TABLE,
    UVMF_INVLPG,
};
use hypercalls::{MachAddr, Pte};
use lazy_mmu::model::{Call, mfn};
use lazy_mmu::program::Layout;
use lazy_mmu::{FlushReason, MmuError, TableLevel, TableOp};
use x86_64::VirtAddr;

fn invlpg(va: VirtAddr) -> TableOp {
    TableOp::InvlpgLocal(va)
}

const TLB: TableOp = TableOp::TlbFlushLocal;

/// The shape of a multicall: "mmuN" for an mmu_update of N requests, "extN" for an mmuext_op
/// of N ops, "uva" for an update_va_mapping.
fn shape(call: &Call) -> Vec<String> {
    let Call::Multicall { calls, result: 0 } = call else {
        panic!("expected one multicall: {call:?}");
    };
    calls
        .iter()
        .map(|c| match c {
            Call::MmuUpdate { reqs, .. } => format!("mmu{}", reqs.len()),
            Call::MmuextOp { ops, .. } => format!("ext{}", ops.len()),
            Call::UpdateVaMapping { .. } => "uva".into(),
            Call::Multicall { .. } => "multicall".into(),
        })
        .collect()
}

#[test]
fn consecutive_writes_coalesce_into_one_entry_and_one_hypercall() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    for slot in 0..10 {
        set(&mut l, &s, slot * 3, slot).unwrap();
    }
    assert_eq!((l.queued_entries(), l.queued_requests()), (1, 10));
    l.leave().unwrap();
    assert_eq!(calls(&l), 1);
    assert!(
        mmu_call(10)(last_call(&l)),
        "one plain mmu_update: {:?}",
        last_call(&l)
    );
    let c = l.counters();
    assert_eq!((c.hypercalls, c.multicalls, c.requests), (1, 0, 10));
}

/// Writes coalesce into one `mmu_update` entry, consecutive TLB operations into one
/// `mmuext_op` entry (Linux: `xen_extend_mmuext_op`); a change of kind starts a new entry.
#[test]
fn writes_and_tlb_ops_coalesce_by_kind() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.table_op(invlpg(s.va(1))).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.table_op(TLB).unwrap();
    l.table_op(TLB).unwrap();
    l.table_op(invlpg(s.va(2))).unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    assert_eq!((l.queued_entries(), l.queued_requests()), (5, 4));
    assert_eq!(calls(&l), 0);
    l.leave().unwrap();
    assert_eq!(calls(&l), 1);
    assert_eq!(
        shape(last_call(&l)),
        ["mmu2", "ext1", "mmu1", "ext3", "mmu1"]
    );
    let Call::Multicall { calls: inner, .. } = last_call(&l) else {
        unreachable!()
    };
    assert!(inner.iter().all(|c| c.result() == 0));
    let Call::MmuextOp { ops, .. } = &inner[3] else {
        unreachable!()
    };
    assert_eq!(
        ops,
        &[
            (MMUEXT_TLB_FLUSH_LOCAL, 0),
            (MMUEXT_TLB_FLUSH_LOCAL, 0),
            (MMUEXT_INVLPG_LOCAL, s.va(2).as_u64())
        ]
    );
    for slot in 0..4 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
    assert_eq!(l.hypervisor().invlpgs, [s.va(1).as_u64(), s.va(2).as_u64()]);
    assert_eq!(l.hypervisor().tlb_flushes, 2);
    let c = l.counters();
    assert_eq!(
        (c.hypercalls, c.multicalls, c.multicall_entries, c.other_ops),
        (1, 1, 5, 4)
    );
}

/// Pins and unpins never share an entry: not with TLB operations before or after them, not
/// with each other.
#[test]
fn pins_and_unpins_get_entries_of_their_own() {
    let (mut l, s) = std_setup();
    let (a, b) = (fresh_frame(&mut l), fresh_frame(&mut l));
    l.enter().unwrap();
    l.table_op(TLB).unwrap();
    l.table_op(TableOp::Pin(TableLevel::L1, mfn(a))).unwrap();
    l.table_op(TableOp::Pin(TableLevel::L1, mfn(b))).unwrap();
    l.table_op(TableOp::Unpin(mfn(b))).unwrap();
    l.table_op(invlpg(s.va(0))).unwrap();
    l.table_op(TLB).unwrap();
    assert_eq!(l.queued_entries(), 5);
    assert_eq!(calls(&l), 0, "single-op entries hold nothing up: no flush");
    l.leave().unwrap();
    assert_eq!(
        shape(last_call(&l)),
        ["ext1", "ext1", "ext1", "ext1", "ext2"]
    );
    let Call::Multicall { calls: inner, .. } = last_call(&l) else {
        unreachable!()
    };
    let cmds: Vec<u32> = inner
        .iter()
        .flat_map(|c| match c {
            Call::MmuextOp { ops, .. } => ops.iter().map(|o| o.0).collect(),
            _ => vec![],
        })
        .collect();
    assert_eq!(
        cmds,
        [
            MMUEXT_TLB_FLUSH_LOCAL,
            MMUEXT_PIN_L1_TABLE,
            MMUEXT_PIN_L1_TABLE,
            MMUEXT_UNPIN_TABLE,
            MMUEXT_INVLPG_LOCAL,
            MMUEXT_TLB_FLUSH_LOCAL
        ]
    );
    let info = l.hypervisor().frame_info(a).unwrap();
    assert!(info.pinned && info.is_table(1));
    assert_eq!(l.hypervisor().frame_info(b).unwrap().count, 0);
    l.hypervisor().check_refcounts();
}

/// A type change queued behind an entry of several requests (which a refusal could hold up
/// until after the type change ran) flushes the batch first; behind single-request entries it
/// shares the multicall. A table hook starts an entry of its own.
#[test]
fn a_type_change_flushes_only_behind_entries_that_can_hold_requests_up() {
    let (mut l, s) = std_setup();
    let (a, b) = (fresh_frame(&mut l), fresh_frame(&mut l));
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.table_op(TableOp::Pin(TableLevel::L1, mfn(a))).unwrap();
    assert_eq!(calls(&l), 0, "behind one write: no flush");
    assert_eq!(l.queued_entries(), 2);
    set(&mut l, &s, 1, 1).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.table_op(TableOp::Unpin(mfn(a))).unwrap();
    assert_eq!(calls(&l), 1, "behind two coalesced writes: flushed first");
    assert_eq!(l.counters().flushes_for(FlushReason::TypeChange), 1);
    assert_eq!(shape(last_call(&l)), ["mmu1", "ext1", "mmu2"]);
    assert_eq!((l.queued_entries(), l.queued_requests()), (1, 0));
    // A hook behind a write: an entry of its own; the writes after it join its entry.
    let l2_slot = 300;
    set(&mut l, &s, 3, 3).unwrap();
    l.set_table_entry(entry_of(s.l2, l2_slot), table_entry(b))
        .unwrap();
    set(&mut l, &s, 4, 4).unwrap();
    assert_eq!((l.queued_entries(), l.queued_requests()), (3, 3));
    // Now an entry holds two requests: the next hook flushes first.
    l.set_table_entry(entry_of(s.l2, l2_slot), Pte::NONE)
        .unwrap();
    assert_eq!(l.counters().flushes_for(FlushReason::TypeChange), 2);
    assert_eq!(shape(last_call(&l)), ["ext1", "mmu1", "mmu2"]);
    assert!(l.hypervisor().frame_info(b).unwrap().is_table(1));
    l.leave().unwrap();
    assert!(mmu_call(1)(last_call(&l)));
    assert_eq!(l.hypervisor().frame_info(b).unwrap().count, 0, "unhooked");
    assert_eq!(l.hypervisor().frame_info(a).unwrap().count, 0, "unpinned");
    for slot in 0..5 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
    l.hypervisor().check_refcounts();
}

#[test]
fn a_single_entry_flush_is_the_plain_hypercall() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    l.table_op(TLB).unwrap();
    l.flush().unwrap();
    assert!(matches!(last_call(&l), Call::MmuextOp { ops, result: 0, .. } if ops.len() == 1));
    let val = s.pte_value(4);
    l.update_va_mapping(s.va(7), val, UVMF_INVLPG).unwrap();
    l.flush().unwrap();
    assert_eq!(
        last_call(&l),
        &Call::UpdateVaMapping {
            va: s.va(7).as_u64(),
            val: val.raw(),
            flags: UVMF_INVLPG,
            result: 0
        }
    );
    assert_eq!(live(&l, &s, 7), val);
    set(&mut l, &s, 1, 1).unwrap();
    l.leave().unwrap();
    assert!(mmu_call(1)(last_call(&l)));
    assert_eq!(l.hypervisor().counts.multicall, 0);
    assert_eq!(l.counters().flushes_for(FlushReason::Explicit), 2);
    // An empty queue flushes nothing.
    l.enter().unwrap();
    l.flush().unwrap();
    l.leave().unwrap();
    assert_eq!(calls(&l), 3);
}

#[test]
fn a_full_request_buffer_flushes_as_full() {
    let (mut l, s) = setup::<4, 16>(1, 32);
    l.enter().unwrap();
    for slot in 0..16 {
        set(&mut l, &s, slot, slot).unwrap();
    }
    assert_eq!(calls(&l), 0, "16 requests fit");
    set(&mut l, &s, 16, 16).unwrap();
    assert_eq!(calls(&l), 1, "the 17th flushes the 16 before it");
    assert!(mmu_call(16)(last_call(&l)));
    assert_eq!(l.counters().flushes_for(FlushReason::Full), 1);
    assert_eq!(l.queued_requests(), 1);
    assert_eq!(live(&l, &s, 15), s.pte_value(15));
    assert_eq!(live(&l, &s, 16), Pte::NONE);
    l.leave().unwrap();
    assert_eq!(live(&l, &s, 16), s.pte_value(16));
    assert_eq!(l.counters().flushes_for(FlushReason::Leave), 1);
}

#[test]
fn a_full_entry_or_op_buffer_flushes_as_full() {
    let (mut l, s) = setup::<4, 16>(1, 32);
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.table_op(TLB).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.table_op(invlpg(s.va(1))).unwrap();
    assert_eq!((l.queued_entries(), calls(&l)), (4, 0));
    // No room for a fifth entry: the write flushes.
    set(&mut l, &s, 2, 2).unwrap();
    assert_eq!(calls(&l), 1);
    assert_eq!(shape(last_call(&l)), ["mmu1", "ext1", "mmu1", "ext1"]);
    // TLB ops join one entry until the op array (4) is full.
    for _ in 0..4 {
        l.table_op(TLB).unwrap();
    }
    assert_eq!((l.queued_entries(), calls(&l)), (2, 1));
    l.table_op(TLB).unwrap();
    assert_eq!(calls(&l), 2, "the fifth op has no room");
    assert_eq!(shape(last_call(&l)), ["mmu1", "ext4"]);
    assert_eq!(l.counters().flushes_for(FlushReason::Full), 2);
    // A write after a TLB run in a full entry buffer.
    l.table_op(invlpg(s.va(3))).unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    l.table_op(TLB).unwrap();
    assert_eq!((l.queued_entries(), calls(&l)), (3, 2));
    set(&mut l, &s, 4, 4).unwrap();
    assert_eq!(calls(&l), 2, "a fourth entry fits");
    set(&mut l, &s, 5, 5).unwrap();
    assert_eq!(calls(&l), 2, "it coalesces");
    l.table_op(TLB).unwrap();
    assert_eq!(calls(&l), 3, "a fifth entry does not fit");
    l.leave().unwrap();
    assert_eq!(l.hypervisor().tlb_flushes, 1 + 5 + 2);
    for slot in 0..6 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
}

#[test]
fn a_read_flushes_only_if_that_entry_has_a_queued_write() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    set(&mut l, &s, 5, 1).unwrap();
    set(&mut l, &s, 6, 2).unwrap();
    assert_eq!(l.read_pte(s.pte_ptr(4)), Ok(Pte::NONE));
    assert_eq!(l.read_pte(s.pte_ptr(512 + 5)), Ok(Pte::NONE));
    assert_eq!(calls(&l), 0, "no hazard, no flush");
    assert_eq!(l.read_pte(s.pte_ptr(6)), Ok(s.pte_value(2)));
    assert_eq!(calls(&l), 1, "the read of a queued entry flushed");
    assert_eq!(l.counters().flushes_for(FlushReason::ReadHazard), 1);
    assert!(l.is_active());
    assert_eq!(l.read_pte(s.pte_ptr(6)), Ok(s.pte_value(2)));
    assert_eq!(calls(&l), 1, "nothing queued any more");
    // A queued update_va_mapping may change any entry: every read flushes it first.
    l.update_va_mapping(s.va(9), s.pte_value(3), 0).unwrap();
    assert_eq!(l.read_pte(s.pte_ptr(0)), Ok(Pte::NONE));
    assert_eq!(calls(&l), 2);
    assert_eq!(live(&l, &s, 9), s.pte_value(3));
    // Queued TLB ops and pins change no entry.
    let t = fresh_frame(&mut l);
    l.table_op(TLB).unwrap();
    l.table_op(TableOp::Pin(TableLevel::L1, mfn(t))).unwrap();
    l.read_pte(s.pte_ptr(9)).unwrap();
    assert_eq!(calls(&l), 2);
    // A read of an entry outside the domain's frames is an error, not a panic.
    let foreign = entry_of(0xdead, 0);
    assert_eq!(
        l.read_pte(foreign),
        Err(lazy_mmu::MmuError::NotOwned { ptr: foreign })
    );
    l.leave().unwrap();
    assert_eq!(l.counters().flushes_for(FlushReason::ReadHazard), 2);
}

#[test]
fn no_hypercall_happens_between_enter_and_leave() {
    let (mut l, s) = std_setup();
    let before = calls(&l);
    l.enter().unwrap();
    for slot in 0..40 {
        set(&mut l, &s, slot, slot % 32).unwrap();
        l.read_pte(s.pte_ptr(slot + 100)).unwrap();
    }
    l.table_op(TLB).unwrap();
    assert_eq!(calls(&l), before);
    l.leave().unwrap();
    assert_eq!(calls(&l), before + 1);
    assert_eq!(l.hypervisor().log[before].requests().len(), 40);
}

/// The low bits of an `mmu_update` pointer are its command: an unaligned entry address is
/// refused before anything is queued or issued, never sent as another command.
#[test]
fn an_unaligned_entry_address_is_refused_not_sent_as_another_command() {
    let (mut l, s) = std_setup();
    let good = s.pte_ptr(3);
    let va = s.va(3);
    for off in 1..8 {
        let bad = MachAddr::new(good.get() + off).unwrap();
        let before = calls(&l);
        assert_eq!(
            l.set_pte(bad, s.pte_value(0), va),
            Err(MmuError::UnalignedPtr { ptr: bad })
        );
        assert_eq!(
            l.set_table_entry(bad, Pte::NONE),
            Err(MmuError::UnalignedPtr { ptr: bad })
        );
        assert_eq!(l.read_pte(bad), Err(MmuError::UnalignedPtr { ptr: bad }));
        l.enter().unwrap();
        assert_eq!(
            l.set_pte(bad, s.pte_value(0), va),
            Err(MmuError::UnalignedPtr { ptr: bad })
        );
        assert_eq!(l.queued_requests(), 0);
        l.leave().unwrap();
        assert_eq!(calls(&l), before, "offset {off}: a hypercall was made");
    }
}
