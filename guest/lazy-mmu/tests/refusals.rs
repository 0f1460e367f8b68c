//! Refusals: how they are named, where they are reported, the replay of what a refusal held
//! up, multicalls Xen rejects or stops part-way, and equality with strict in-order execution.

mod common;

use common::*;
use hypercalls::abi::{MMUEXT_INVLPG_LOCAL, MMUEXT_PIN_L1_TABLE, MmuUpdate, MmuextOp};
use hypercalls::{MachAddr, PartialFailure, Pte, XenError};
use lazy_mmu::model::{Call, Model, PageType, mfn};
use lazy_mmu::program::Layout;
use lazy_mmu::{
    Batch, Entry, EntryOutcome, FlushReason, Hypervisor, LazyMmu, MAX_REPORTED, MulticallFailure,
    ReadError, Refusal, Request, TableLevel, TableOp,
};
use x86_64::VirtAddr;

const TLB: TableOp = TableOp::TlbFlushLocal;

#[test]
fn a_refused_request_mid_batch_is_named_and_everything_else_takes_effect() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    // Xen never lets a guest map one of its page tables writable (get_page_from_l1e: -EBUSY).
    let bad = writable(table);
    l.enter().unwrap();
    for slot in 0..3 {
        set(&mut l, &s, slot, slot).unwrap();
    }
    put(&mut l, &s, 3, bad).unwrap();
    set(&mut l, &s, 4, 4).unwrap();
    set(&mut l, &s, 5, 5).unwrap();
    l.table_op(TableOp::InvlpgLocal(s.va(3))).unwrap();
    for slot in 512..515 {
        set(&mut l, &s, slot, slot - 500).unwrap();
    }
    assert_eq!(l.queued_entries(), 3);
    let f = refused(l.leave());
    assert_eq!(f.flush, Some(FlushReason::Leave));
    assert_eq!(f.count, 1);
    assert_eq!(
        f.first,
        Refusal {
            entry: 0,
            index: 3,
            request: Some(set_pte_request(&s, 3, bad)),
            error: XenError::Busy,
        }
    );
    assert_eq!(listed(&l), [f.first]);
    let text = f.to_string();
    assert!(text.contains("entry 0 request 3"), "{text}");
    assert!(text.contains("leave flush"), "{text}");
    for slot in [0, 1, 2, 4, 5] {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot), "slot {slot}");
    }
    for slot in 512..515 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot - 500), "slot {slot}");
    }
    assert_eq!(live(&l, &s, 3), Pte::NONE);
    let info = l.hypervisor().frame_info(table).unwrap();
    assert_eq!((info.ty, info.count, info.pinned), (PageType::L1, 1, true));
    assert_eq!(l.counters().rejected, 1);
    assert!(!l.is_active());
    l.hypervisor().check_refcounts();
}

/// A table hook is its own entry (writes after it join that entry); a refused hook is named
/// as a table-entry write, and the write it held up still lands.
#[test]
fn a_refused_hook_in_a_later_entry_names_that_entry() {
    let (mut l, s) = std_setup();
    // An L2 entry must point at an L1 table; a frame mapped writable cannot become one
    // (_get_page_type: -EINVAL).
    set(&mut l, &s, 0, 0).unwrap();
    let l2_ptr = entry_of(s.l2, 100);
    let bad = table_entry(s.data[0]);
    l.enter().unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.table_op(TLB).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.set_table_entry(l2_ptr, bad).unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    assert_eq!(l.queued_entries(), 4);
    let f = refused(l.leave());
    assert_eq!(f.count, 1);
    assert_eq!(
        f.first,
        Refusal {
            entry: 3,
            index: 0,
            request: Some(Request::SetTableEntry {
                ptr: l2_ptr,
                val: bad
            }),
            error: XenError::Inval,
        }
    );
    for slot in 0..4 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
    assert_eq!(l.hypervisor().entry(s.l2, 100), 0);
    l.hypervisor().check_refcounts();
}

#[test]
fn several_refusals_are_all_counted_and_the_first_ones_listed() {
    let (mut l, s) = setup::<4, 16>(1, 32);
    let table = pinned_l1(&mut l);
    let bad = writable(table);
    l.enter().unwrap();
    for slot in 0..20 {
        if slot % 2 == 0 {
            put(&mut l, &s, slot, bad).unwrap();
        } else {
            set(&mut l, &s, slot, slot).unwrap();
        }
    }
    let f = refused(l.leave());
    assert_eq!(f.count, 10);
    assert_eq!(
        f.flush,
        Some(FlushReason::Full),
        "the first was in the full flush"
    );
    let named: Vec<(u16, u32)> = listed(&l).iter().map(|r| (r.entry, r.index)).collect();
    assert_eq!(
        named,
        [
            (0, 0),
            (0, 2),
            (0, 4),
            (0, 6),
            (0, 8),
            (0, 10),
            (0, 12),
            (0, 14)
        ]
    );
    assert_eq!(listed(&l).len(), MAX_REPORTED);
    assert_eq!(f.first.index, 0);
    for slot in 0..20 {
        let want = if slot % 2 == 0 {
            Pte::NONE
        } else {
            s.pte_value(slot)
        };
        assert_eq!(live(&l, &s, slot), want);
    }
    assert!(
        f.to_string()
            .starts_with("10 request(s) refused, the first in a full flush: entry 0 request 0"),
        "{f}"
    );
    assert_eq!(l.counters().rejected, 10);
}

#[test]
fn an_immediate_refusal_is_reported() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let bad = writable(table);
    let f = refused(put(&mut l, &s, 9, bad));
    assert_eq!(f.flush, None);
    assert_eq!(f.count, 1);
    assert_eq!(
        f.first,
        Refusal {
            entry: 0,
            index: 0,
            request: Some(set_pte_request(&s, 9, bad)),
            error: XenError::Busy
        }
    );
    assert!(f.to_string().contains("when issued at once"), "{f}");
    // Read-only is fine: Xen allows read-only mappings of page tables.
    let ro = Pte::from_raw(bad.raw() & !lazy_mmu::model::RW);
    put(&mut l, &s, 9, ro).unwrap();
    assert_eq!(live(&l, &s, 9), ro);
    // A table op issued at once is named as one.
    let f = refused(l.table_op(TableOp::Unpin(mfn(s.data[0]))));
    assert_eq!(
        (f.first.request, f.first.error),
        (
            Some(Request::TableOp(TableOp::Unpin(mfn(s.data[0])))),
            XenError::Inval
        )
    );
}

/// The old core reported `MulticallRejected`; now a multicall Xen cannot run at all is issued
/// one entry at a time and, with nothing refused, nothing is reported.
#[test]
fn a_rejected_multicall_falls_back_to_one_hypercall_per_entry() {
    let (mut l, s) = std_setup();
    l.hypervisor_mut().multicall_limit = 1;
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.table_op(TableOp::InvlpgLocal(s.va(1))).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.update_va_mapping(s.va(3), s.pte_value(3), 0).unwrap();
    assert_eq!(l.leave(), Ok(()));
    let log = &l.hypervisor().log;
    assert_eq!(log.len(), 5);
    assert!(
        matches!(&log[0], Call::Multicall { calls, result } if calls.is_empty() && *result == -22)
    );
    assert!(mmu_call(2)(&log[1]));
    assert!(
        matches!(&log[2], Call::MmuextOp { ops, result: 0, .. } if ops == &[(MMUEXT_INVLPG_LOCAL, s.va(1).as_u64())])
    );
    assert!(mmu_call(1)(&log[3]));
    assert!(matches!(&log[4], Call::UpdateVaMapping { result: 0, .. }));
    for slot in 0..4 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
    assert_eq!(l.hypervisor().counts.rejected_multicalls, 1);
    assert_eq!(l.counters().hypercalls, 5);
    assert_eq!(l.counters().multicall_failures, 1);
}

#[test]
fn a_rejected_multicall_still_names_refused_requests() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    l.hypervisor_mut().multicall_limit = 0;
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.table_op(TLB).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    put(&mut l, &s, 2, writable(table)).unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    let f = refused(l.leave());
    assert_eq!(f.count, 1);
    let r = f.first;
    assert_eq!((r.entry, r.index, r.error), (2, 1, XenError::Busy));
    assert_eq!(r.request, Some(set_pte_request(&s, 2, writable(table))));
    for slot in [0, 1, 3] {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
}

/// Xen runs every entry of a multicall, so the requests a refusal held up run after the later
/// entries did. They must not undo a later write to the same entry, nor land after a later
/// invalidation of their mapping.
#[test]
fn requests_held_up_by_a_refusal_do_not_overtake_later_entries() {
    let (mut l, s, bad) = refusing_setup();
    let mut reference = l.hypervisor().clone();
    l.enter().unwrap();
    put(&mut l, &s, 0, bad).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.table_op(TableOp::InvlpgLocal(s.va(1))).unwrap();
    set(&mut l, &s, 1, 2).unwrap();
    l.update_va_mapping(s.va(4), s.pte_value(4), 0).unwrap();
    set(&mut l, &s, 4, 5).unwrap();
    l.update_va_mapping(s.va(1), s.pte_value(3), 0).unwrap();
    let f = refused(l.leave());
    assert_eq!(f.count, 1, "{f}");
    assert_eq!(live(&l, &s, 0), Pte::NONE);
    assert_eq!(
        live(&l, &s, 1),
        s.pte_value(3),
        "the last write to slot 1 wins"
    );
    assert_eq!(
        live(&l, &s, 4),
        s.pte_value(5),
        "the last write to slot 4 wins"
    );
    // After the last time slot 1 was set to frame 1, its invalidation must still follow.
    let flat = flat_log(&l);
    let first_value = s.pte_value(1).raw();
    let last_write = flat
        .iter()
        .rposition(|c| c.requests().iter().any(|&(_, v)| v == first_value))
        .unwrap();
    assert!(
        flat[last_write..]
            .iter()
            .any(|c| matches!(c, Call::MmuextOp { ops, .. } if ops[0].0 == MMUEXT_INVLPG_LOCAL)),
        "{flat:#?}"
    );
    // The same as strict in-order execution.
    let requests = [
        set_pte_request(&s, 0, bad),
        set_pte_request(&s, 1, s.pte_value(1)),
        Request::TableOp(TableOp::InvlpgLocal(s.va(1))),
        set_pte_request(&s, 1, s.pte_value(2)),
        Request::UpdateVaMapping {
            va: s.va(4),
            val: s.pte_value(4),
            flags: 0,
        },
        set_pte_request(&s, 4, s.pte_value(5)),
        Request::UpdateVaMapping {
            va: s.va(1),
            val: s.pte_value(3),
            flags: 0,
        },
    ];
    assert_eq!(strict(&mut reference, &requests), listed_requests(&l));
    assert!(l.hypervisor().same_tables(&reference));
    l.hypervisor().check_refcounts();
}

/// What a refusal held up is reissued as one multicall from the request after the refused one
/// to the end of the batch (repeated while refusals hold requests up), not one hypercall per
/// entry.
#[test]
fn the_rest_of_a_batch_is_reissued_as_one_multicall() {
    let (mut l, s, bad) = refusing_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    put(&mut l, &s, 1, bad).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.table_op(TLB).unwrap();
    put(&mut l, &s, 3, bad).unwrap();
    set(&mut l, &s, 4, 4).unwrap();
    l.table_op(TLB).unwrap();
    set(&mut l, &s, 5, 5).unwrap();
    let before = l.counters();
    let f = refused(l.leave());
    assert_eq!(f.count, 2);
    let named: Vec<(u16, u32)> = listed(&l).iter().map(|r| (r.entry, r.index)).collect();
    assert_eq!(
        named,
        [(0, 1), (2, 0)],
        "entry and index in the queued batch"
    );
    let log = &l.hypervisor().log;
    let sizes = |c: &Call| match c {
        Call::Multicall { calls, .. } => calls.iter().map(|c| c.requests().len()).collect(),
        c => vec![c.requests().len()],
    };
    // The batch; from slot 2 on; from slot 4 on.
    assert_eq!(log.len(), 3, "{log:#?}");
    assert_eq!(sizes(&log[0]), [3, 0, 2, 0, 1]);
    assert_eq!(sizes(&log[1]), [1, 0, 2, 0, 1]);
    assert_eq!(sizes(&log[2]), [1, 0, 1]);
    let d = l.counters().since(&before);
    assert_eq!((d.hypercalls, d.multicalls, d.replays), (3, 3, 2));
    assert_eq!(
        l.hypervisor().tlb_flushes,
        2 + 2 + 1,
        "TLB ops may run again"
    );
    for slot in [0, 2, 4, 5] {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
}

#[test]
fn a_refused_update_va_mapping_in_a_multicall_names_its_address() {
    let (mut l, s, bad) = refusing_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.update_va_mapping(s.va(6), bad, 0).unwrap();
    let f = refused(l.leave());
    let want = Request::UpdateVaMapping {
        va: s.va(6),
        val: bad,
        flags: 0,
    };
    assert_eq!(
        (f.first.entry, f.first.request, f.first.error),
        (1, Some(want), XenError::Busy)
    );
    // The same refusal issued directly names it the same way.
    let direct = refused(l.update_va_mapping(s.va(6), bad, 0));
    assert_eq!(direct.first.request, Some(want));
    assert_eq!(direct.flush, None);
}

/// A refusal in a flush the caller did not ask for (full buffer, read hazard, nested leave) is
/// reported by the call that ends the batching, not by whichever call triggered the flush.
#[test]
fn refusals_of_implicit_flushes_are_reported_where_batching_ends() {
    let (mut l, s) = setup::<4, 4>(2, 32);
    let table = pinned_l1(&mut l);
    let bad = writable(table);
    l.enter().unwrap();
    put(&mut l, &s, 0, bad).unwrap();
    for slot in 1..4 {
        set(&mut l, &s, slot, slot).unwrap();
    }
    // The buffer is full: this write flushes the refused request, yet succeeds itself.
    assert_eq!(set(&mut l, &s, 4, 4), Ok(()));
    assert_eq!(l.counters().flushes_for(FlushReason::Full), 1);
    assert_eq!(l.pending_refusals(), 1);
    // A read hazard's flush keeps its refusal too.
    put(&mut l, &s, 6, bad).unwrap();
    assert_eq!(l.read_pte(s.pte_ptr(6)), Ok(Pte::NONE));
    assert_eq!(l.counters().flushes_for(FlushReason::ReadHazard), 1);
    // A nested section (what set_ptes() opens) ends without handing over the outer refusals.
    assert_eq!(
        l.set_ptes(s.va(8), s.pte_ptr(8), 2, |i| s.pte_value(8 + i as usize)),
        Ok(())
    );
    let f = refused(l.leave());
    assert_eq!(f.count, 2);
    assert_eq!(f.flush, Some(FlushReason::Full));
    assert_eq!(
        listed_requests(&l),
        [
            (Some(set_pte_request(&s, 0, bad)), XenError::Busy),
            (Some(set_pte_request(&s, 6, bad)), XenError::Busy)
        ]
    );
    for slot in (1..5).chain(8..10) {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot), "slot {slot}");
    }
    // Reported once: the next section starts clean.
    l.enter().unwrap();
    set(&mut l, &s, 5, 5).unwrap();
    assert_eq!(l.leave(), Ok(()));
}

/// A pin of a frame whose writable mapping a held-up request removes. The old core queued the
/// pin behind the writes and retried it after the replay; now queuing the pin behind an entry
/// of several requests flushes them first (`TypeChange`), so the pin runs after them in order.
#[test]
fn a_pin_behind_held_up_requests_runs_after_them() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let bad = writable(table);
    let frame = fresh_frame(&mut l);
    // The frame is mapped writable at slot 3: it cannot become a page table until unmapped.
    put(&mut l, &s, 3, writable(frame)).unwrap();
    l.enter().unwrap();
    put(&mut l, &s, 0, bad).unwrap();
    put(&mut l, &s, 3, Pte::NONE).unwrap();
    l.table_op(TableOp::Pin(TableLevel::L1, mfn(frame)))
        .unwrap();
    assert_eq!(l.counters().flushes_for(FlushReason::TypeChange), 1);
    let f = refused(l.leave());
    assert_eq!((f.count, f.first.entry, f.first.index), (1, 0, 0), "{f}");
    assert_eq!(f.flush, Some(FlushReason::TypeChange));
    assert_eq!(live(&l, &s, 3), Pte::NONE);
    let info = l.hypervisor().frame_info(frame).expect("frame exists");
    assert!(info.pinned && info.is_table(1), "{info:?}");
    l.hypervisor().check_refcounts();
}

/// Entries before the held-up requests are settled by the multicall; their refusals are
/// reported once, and they are not issued again.
#[test]
fn entries_before_a_held_up_refusal_are_not_reissued() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let bad = writable(table);
    l.enter().unwrap();
    l.update_va_mapping(s.va(7), bad, 0).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    put(&mut l, &s, 2, bad).unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    let f = refused(l.leave());
    let update_va_mappings = flat_log(&l)
        .iter()
        .filter(|c| matches!(c, Call::UpdateVaMapping { .. }))
        .count();
    assert_eq!(f.count, 2, "{f}");
    let named: Vec<(u16, u32)> = listed(&l).iter().map(|r| (r.entry, r.index)).collect();
    assert_eq!(named, [(0, 0), (1, 1)]);
    assert_eq!(update_va_mappings, 1, "issued once, in the multicall");
    for slot in [1, 3] {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
}

/// Regression (type order): slot 0 <- a refused value; slot 1 <- frame F writable; a TLB
/// flush; L2[100] <- F as an L1 table. In strict queue order slot 1 maps F writable, so the
/// hook is refused (F cannot become a page table: -EINVAL). The old core ran the hook early
/// (its entry ran while the write to slot 1 was held up behind the refusal), so F became a
/// table and the replayed write to slot 1 was refused instead.
#[test]
fn a_hook_queued_behind_held_up_writes_keeps_queue_order() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let f_frame = fresh_frame(&mut l);
    let bad = writable(table);
    let hook = Request::SetTableEntry {
        ptr: entry_of(s.l2, 100),
        val: table_entry(f_frame),
    };
    let requests = [
        set_pte_request(&s, 0, bad),
        set_pte_request(&s, 1, writable(f_frame)),
        Request::TableOp(TLB),
        hook,
    ];
    let mut reference = l.hypervisor().clone();
    let want = strict(&mut reference, &requests);
    assert_eq!(
        want,
        [
            (Some(requests[0]), XenError::Busy),
            (Some(hook), XenError::Inval)
        ],
        "the model's strict order"
    );

    l.enter().unwrap();
    put(&mut l, &s, 0, bad).unwrap();
    put(&mut l, &s, 1, writable(f_frame)).unwrap();
    l.table_op(TLB).unwrap();
    l.set_table_entry(entry_of(s.l2, 100), table_entry(f_frame))
        .unwrap();
    let f = refused(l.leave());
    assert_eq!(f.count, 2);
    assert_eq!(listed_requests(&l), want);
    assert!(l.hypervisor().same_tables(&reference));
    assert_eq!(
        l.hypervisor().frame_info(f_frame),
        reference.frame_info(f_frame)
    );
    assert_eq!(
        l.hypervisor().frame_info(f_frame).unwrap().ty,
        PageType::Writable
    );
    assert_eq!(live(&l, &s, 1), writable(f_frame));
    assert_eq!(l.hypervisor().entry(s.l2, 100), 0);
    l.hypervisor().check_refcounts();
}

/// The same with the hook right behind one refused write (an entry that alone cannot hold
/// anything up) and the write of F after the TLB flush: the hook must not join the refused
/// write's entry, or it would be held up and run after the later write.
#[test]
fn a_hook_behind_one_refused_write_keeps_queue_order() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let f_frame = fresh_frame(&mut l);
    let bad = writable(table);
    let hook = Request::SetTableEntry {
        ptr: entry_of(s.l2, 100),
        val: table_entry(f_frame),
    };
    let requests = [
        set_pte_request(&s, 0, bad),
        hook,
        Request::TableOp(TLB),
        set_pte_request(&s, 1, writable(f_frame)),
    ];
    let mut reference = l.hypervisor().clone();
    let want = strict(&mut reference, &requests);
    assert_eq!(
        want,
        [
            (Some(requests[0]), XenError::Busy),
            (Some(requests[3]), XenError::Busy)
        ]
    );
    l.enter().unwrap();
    put(&mut l, &s, 0, bad).unwrap();
    l.set_table_entry(entry_of(s.l2, 100), table_entry(f_frame))
        .unwrap();
    l.table_op(TLB).unwrap();
    put(&mut l, &s, 1, writable(f_frame)).unwrap();
    let f = refused(l.leave());
    assert_eq!(f.count, 2);
    assert_eq!(listed_requests(&l), want);
    assert!(l.hypervisor().same_tables(&reference));
    assert!(l.hypervisor().frame_info(f_frame).unwrap().is_table(1));
    l.hypervisor().check_refcounts();
}

/// Regression: Xen stops a multicall part-way (it could not read an entry) after a pin ran.
/// The old core reported `MulticallRejected` and issued every entry again, so the pin ran twice
/// and was refused ("already pinned"): a false refusal. Now only the entries that did not run
/// are issued again.
#[test]
fn a_multicall_stopped_part_way_issues_only_the_rest_again() {
    for stop_after in [1, 2, 3] {
        let (mut l, s) = std_setup();
        let frame = fresh_frame(&mut l);
        l.hypervisor_mut().multicall_fault_after = Some(stop_after);
        l.enter().unwrap();
        l.table_op(TableOp::Pin(TableLevel::L1, mfn(frame)))
            .unwrap();
        set(&mut l, &s, 0, 0).unwrap();
        l.table_op(TLB).unwrap();
        set(&mut l, &s, 1, 1).unwrap();
        l.table_op(TableOp::InvlpgLocal(s.va(1))).unwrap();
        assert_eq!(l.queued_entries(), 5);
        assert_eq!(
            l.leave(),
            Ok(()),
            "stopped after {stop_after}: no false refusal"
        );
        let pins = flat_log(&l)
            .iter()
            .filter(|c| matches!(c, Call::MmuextOp { ops, .. } if ops[0].0 == MMUEXT_PIN_L1_TABLE))
            .count();
        assert_eq!(pins, 1, "stopped after {stop_after}: the pin ran once");
        let info = l.hypervisor().frame_info(frame).unwrap();
        assert!(info.pinned && info.is_table(1));
        assert_eq!(live(&l, &s, 0), s.pte_value(0));
        assert_eq!(live(&l, &s, 1), s.pte_value(1));
        assert_eq!(l.hypervisor().tlb_flushes, 1);
        assert_eq!(l.hypervisor().invlpgs, [s.va(1).as_u64()]);
        assert!(l.counters().multicall_failures >= 1);
        assert_eq!(l.counters().rejected, 0);
        l.hypervisor().check_refcounts();
    }
}

/// A multicall stopped part-way after a refusal that held requests up: the replay and the
/// rest of the batch still run in order, and only the real refusal is reported.
#[test]
fn a_multicall_stopped_part_way_after_a_refusal_reports_only_that_refusal() {
    let (mut l, s, bad) = refusing_setup();
    l.hypervisor_mut().multicall_fault_after = Some(2);
    let mut reference = l.hypervisor().clone();
    l.enter().unwrap();
    put(&mut l, &s, 0, bad).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.table_op(TLB).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.table_op(TLB).unwrap();
    set(&mut l, &s, 1, 3).unwrap();
    let f = refused(l.leave());
    let requests = [
        set_pte_request(&s, 0, bad),
        set_pte_request(&s, 1, s.pte_value(1)),
        Request::TableOp(TLB),
        set_pte_request(&s, 2, s.pte_value(2)),
        Request::TableOp(TLB),
        set_pte_request(&s, 1, s.pte_value(3)),
    ];
    assert_eq!(listed_requests(&l), strict(&mut reference, &requests));
    assert_eq!(f.count, 1);
    assert!(l.hypervisor().same_tables(&reference));
}

/// A hypervisor that fails every `mmu_update` after doing all its requests (`done == count`),
/// as Xen may when it cannot write `pdone` back.
#[derive(Clone)]
struct FailsAfterAll(Model);

impl Hypervisor for FailsAfterAll {
    fn mmu_update(&mut self, reqs: &[MmuUpdate]) -> Result<(), PartialFailure> {
        self.0.mmu_update(reqs)?;
        Err(PartialFailure {
            done: reqs.len() as u32,
            error: XenError::Fault,
        })
    }
    fn mmuext_op(&mut self, ops: &[MmuextOp]) -> Result<(), PartialFailure> {
        self.0.mmuext_op(ops)
    }
    fn update_va_mapping(&mut self, va: VirtAddr, val: Pte, flags: u64) -> Result<(), XenError> {
        self.0.update_va_mapping(va, val, flags)
    }
    fn multicall(
        &mut self,
        batch: Batch<'_>,
        outcomes: &mut [EntryOutcome],
    ) -> Result<(), MulticallFailure> {
        self.0.multicall(batch, outcomes)?;
        for (e, o) in batch.entries.iter().zip(outcomes.iter_mut()) {
            if let (Entry::Updates { count, .. }, 0) = (e, o.result) {
                *o = EntryOutcome {
                    result: XenError::Fault.errno(),
                    done: u32::from(*count),
                };
            }
        }
        Ok(())
    }
    fn read_pte(&self, ptr: MachAddr) -> Result<Pte, ReadError> {
        self.0.read_pte(ptr)
    }
}

/// Regression: the old core pinned such a failure on the entry's last request (`min(len - 1)`),
/// which Xen had in fact done. Now no request is blamed (`request: None`, index = count).
#[test]
fn a_failure_after_every_request_was_done_blames_no_request() {
    let mut model = Model::new();
    let s = model.build_space(1, 8);
    let mut l: LazyMmu<FailsAfterAll> = LazyMmu::new(FailsAfterAll(model));
    let set = |l: &mut LazyMmu<FailsAfterAll>, slot: usize| {
        l.set_pte(s.pte_ptr(slot), s.pte_value(slot), s.va(slot))
    };
    // At once.
    let f = refused(set(&mut l, 0));
    assert_eq!(
        f.first,
        Refusal {
            entry: 0,
            index: 1,
            request: None,
            error: XenError::Fault
        }
    );
    assert!(
        f.first.to_string().contains("after all 1 requests"),
        "{}",
        f.first
    );
    // A single-entry flush of three requests.
    l.enter().unwrap();
    for slot in 1..4 {
        set(&mut l, slot).unwrap();
    }
    let f = refused(l.leave());
    assert_eq!((f.count, f.first.index, f.first.request), (1, 3, None));
    // In a multicall: the entry fails as a whole; the entries around it are unaffected.
    l.enter().unwrap();
    set(&mut l, 4).unwrap();
    set(&mut l, 5).unwrap();
    l.table_op(TLB).unwrap();
    set(&mut l, 6).unwrap();
    let f = refused(l.leave());
    let named: Vec<(u16, u32, Option<Request>)> = l
        .last_refusals()
        .map(|r| (r.entry, r.index, r.request))
        .collect();
    assert_eq!(named, [(0, 2, None), (2, 1, None)]);
    assert_eq!(f.count, 2);
    for slot in 0..7 {
        assert_eq!(
            l.hypervisor().read_pte(s.pte_ptr(slot)),
            Ok(s.pte_value(slot)),
            "every write was done"
        );
    }
}

/// `Counters::rejected` counts every request Xen refused, as the old core's did: those of
/// flushes and those issued at once (outside lazy mode, paused, a paused `set_ptes`).
#[test]
fn the_rejected_counter_counts_refusals_issued_at_once() {
    let (mut l, s, bad) = refusing_setup();
    l.enter().unwrap();
    put(&mut l, &s, 0, bad).unwrap();
    refused(l.leave());
    assert_eq!(l.counters().rejected, 1, "in a flush");
    refused(put(&mut l, &s, 1, bad));
    assert_eq!(l.counters().rejected, 2, "at once");
    refused(l.table_op(TableOp::Unpin(mfn(s.data[0]))));
    refused(l.update_va_mapping(s.va(2), bad, 0));
    l.enter().unwrap();
    l.pause().unwrap();
    refused(l.set_ptes(s.va(3), s.pte_ptr(3), 2, |_| bad));
    assert_eq!(l.counters().rejected, 6, "every refusal");
}
