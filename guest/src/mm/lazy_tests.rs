//! Host tests of the lazy-MMU core against the model.

use hypercalls::XenError;
use hypercalls::abi::{
    MMUEXT_INVLPG_LOCAL, MMUEXT_PIN_L1_TABLE, MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_UNPIN_TABLE, MmuextOp,
    UVMF_INVLPG, mmuext_mfn, mmuext_plain, mmuext_va,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::lazy::{
    DEFAULT_ENTRIES, DEFAULT_REQUESTS, Entry, FlushReason, Hypervisor, LINUX_ENTRIES,
    LINUX_REQUESTS, LazyMmu, MAX_REPORTED, MmuError, Rejected, SetPtesRule,
};
use super::model::{Call, FrameInfo, Model, PageType, RW, Space};
use crate::stress::{self, GenOptions, Layout, Observer, Op, Shadow};

type Lazy<const E: usize, const R: usize> = LazyMmu<Model, E, R>;

/// A model with `tables` empty L1 tables and `data` data frames, and a lazy-MMU state over it.
fn setup<const E: usize, const R: usize>(tables: usize, data: usize) -> (Lazy<E, R>, Space) {
    let mut model = Model::new();
    let space = model.build_space(tables, data);
    (LazyMmu::new(model), space)
}

fn std_setup() -> (Lazy<DEFAULT_ENTRIES, DEFAULT_REQUESTS>, Space) {
    setup(2, 32)
}

fn set<const E: usize, const R: usize>(
    l: &mut Lazy<E, R>,
    s: &Space,
    slot: usize,
    frame: usize,
) -> Result<(), MmuError> {
    l.set_pte(s.pte_ptr(slot), s.pte_value(frame), s.va(slot))
}

/// The live entry of `slot`, straight from the model.
fn live<const E: usize, const R: usize>(l: &Lazy<E, R>, s: &Space, slot: usize) -> u64 {
    l.hypervisor().read_pte(s.pte_ptr(slot))
}

/// Hypercalls logged so far (a multicall counts once).
fn calls<const E: usize, const R: usize>(l: &Lazy<E, R>) -> usize {
    l.hypervisor().log.len()
}

fn last_call<const E: usize, const R: usize>(l: &Lazy<E, R>) -> &Call {
    l.hypervisor().log.last().expect("a hypercall")
}

fn invlpg(va: u64) -> MmuextOp {
    mmuext_va(MMUEXT_INVLPG_LOCAL, va)
}

fn tlb_flush() -> MmuextOp {
    mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL)
}

/// A fresh frame pinned as an L1 table (outside the lazy layer, as set-up).
fn pinned_l1<const E: usize, const R: usize>(l: &mut Lazy<E, R>) -> u64 {
    let hv = l.hypervisor_mut();
    let t = hv.alloc();
    hypercall_ok(hv.mmuext_op(&[mmuext_mfn(MMUEXT_PIN_L1_TABLE, t)]));
    hv.reset_stats();
    t
}

fn hypercall_ok<T, E: core::fmt::Debug>(r: Result<T, E>) -> T {
    r.expect("set-up hypercall")
}

fn mmu_call(reqs: usize) -> impl Fn(&Call) -> bool {
    move |c| matches!(c, Call::MmuUpdate { reqs: r, result: 0, .. } if r.len() == reqs)
}

// ---- The state machine ----

#[test]
fn outermost_enter_batches_and_outermost_leave_flushes() {
    let (mut l, s) = std_setup();
    assert!(!l.is_active());
    l.enter().unwrap();
    assert!(l.is_active());
    assert_eq!(l.depth(), 1);
    set(&mut l, &s, 0, 0).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    assert_eq!(calls(&l), 0, "writes in a lazy section are queued");
    assert_eq!(live(&l, &s, 0), 0);
    l.leave().unwrap();
    assert!(!l.is_active());
    assert_eq!(l.depth(), 0);
    assert_eq!(calls(&l), 1);
    assert_eq!(live(&l, &s, 0), s.pte_value(0));
    assert_eq!(live(&l, &s, 1), s.pte_value(1));
    assert_eq!(l.counters().flushes_for(FlushReason::Leave), 1);
    assert_eq!(l.queued_entries(), 0);
    // Outside lazy mode every write is its own hypercall.
    set(&mut l, &s, 2, 2).unwrap();
    assert_eq!(calls(&l), 2);
    assert_eq!(live(&l, &s, 2), s.pte_value(2));
}

#[test]
fn nested_leave_flushes_and_stays_lazy() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.enter().unwrap();
    assert_eq!(l.depth(), 2);
    set(&mut l, &s, 1, 1).unwrap();
    assert_eq!(calls(&l), 0, "a nested enter does not flush");
    l.leave().unwrap();
    assert_eq!(calls(&l), 1, "a nested leave flushes");
    assert!(l.is_active());
    assert_eq!(l.depth(), 1);
    assert_eq!(live(&l, &s, 0), s.pte_value(0));
    assert_eq!(live(&l, &s, 1), s.pte_value(1));
    assert_eq!(l.counters().flushes_for(FlushReason::NestedLeave), 1);
    set(&mut l, &s, 2, 2).unwrap();
    assert_eq!(calls(&l), 1, "still batching after the nested leave");
    l.leave().unwrap();
    assert_eq!(calls(&l), 2);
    assert_eq!(l.counters().flushes_for(FlushReason::Leave), 1);
    assert!(!l.is_active());
}

#[test]
fn pause_flushes_and_resume_batches_again_at_the_same_depth() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.pause().unwrap();
    assert_eq!(calls(&l), 1, "pause flushes");
    assert_eq!(l.counters().flushes_for(FlushReason::Pause), 1);
    assert!(l.is_paused() && !l.is_active());
    assert_eq!(live(&l, &s, 0), s.pte_value(0));
    set(&mut l, &s, 1, 1).unwrap();
    assert_eq!(calls(&l), 2, "paused writes are issued at once");
    assert_eq!(live(&l, &s, 1), s.pte_value(1));
    l.resume().unwrap();
    assert!(l.is_active() && !l.is_paused());
    assert_eq!(l.depth(), 2);
    set(&mut l, &s, 2, 2).unwrap();
    assert_eq!(calls(&l), 2, "batching again after resume");
    l.leave().unwrap();
    l.leave().unwrap();
    assert_eq!(calls(&l), 3);
    assert_eq!(live(&l, &s, 2), s.pte_value(2));
}

#[test]
fn pauses_nest_and_only_the_first_flushes() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.pause().unwrap();
    l.pause().unwrap();
    assert_eq!(l.counters().flushes_for(FlushReason::Pause), 1);
    l.resume().unwrap();
    assert!(l.is_paused() && !l.is_active(), "one resume of two pauses");
    set(&mut l, &s, 1, 1).unwrap();
    assert_eq!(calls(&l), 2, "still paused: issued at once");
    l.resume().unwrap();
    assert!(l.is_active());
    l.leave().unwrap();
}

#[test]
fn enter_and_leave_are_ignored_while_paused() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    l.pause().unwrap();
    l.enter().unwrap();
    l.enter().unwrap();
    assert_eq!(l.depth(), 1);
    set(&mut l, &s, 0, 0).unwrap();
    assert_eq!(calls(&l), 1, "entering while paused does not batch");
    l.leave().unwrap();
    l.leave().unwrap();
    l.leave().unwrap();
    assert_eq!(l.depth(), 1, "leaving while paused does not count");
    l.resume().unwrap();
    assert!(l.is_active());
    l.leave().unwrap();
    assert!(!l.is_active());
    assert_eq!(l.depth(), 0);

    // A pause outside lazy mode: nothing to flush, and enter/leave inside it are ignored too.
    l.pause().unwrap();
    l.enter().unwrap();
    assert!(!l.is_active());
    assert_eq!(l.depth(), 0);
    l.leave().unwrap();
    l.resume().unwrap();
    assert!(!l.is_active());
    assert_eq!(l.counters().flushes_for(FlushReason::Pause), 0);
}

#[test]
fn unbalanced_leave_and_resume_are_errors_and_change_nothing() {
    let (mut l, _) = std_setup();
    assert_eq!(l.leave(), Err(MmuError::UnbalancedLeave));
    assert_eq!(l.resume(), Err(MmuError::UnbalancedResume));
    assert_eq!(l.depth(), 0);
    assert!(!l.is_paused());
    l.enter().unwrap();
    l.leave().unwrap();
    assert_eq!(l.leave(), Err(MmuError::UnbalancedLeave));
    l.pause().unwrap();
    l.resume().unwrap();
    assert_eq!(l.resume(), Err(MmuError::UnbalancedResume));
    assert!(!l.is_active() && !l.is_paused());
    assert_eq!(calls(&l), 0);
}

#[test]
fn strict_mode_refuses_a_nested_enter() {
    let (mut l, s) = std_setup();
    l.set_strict(true);
    assert!(l.is_strict());
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    assert_eq!(l.enter(), Err(MmuError::NestedEnter { depth: 1 }));
    assert_eq!(l.depth(), 1);
    // set_ptes() enters lazy mode itself, so inside a section it hits the same error, before
    // queueing anything.
    let r = l.set_ptes(s.va(8), s.pte_ptr(8), 2, |i| s.pte_value(1 + i as usize));
    assert_eq!(r, Err(MmuError::NestedEnter { depth: 1 }));
    assert_eq!(l.queued_requests(), 1);
    l.leave().unwrap();
    assert_eq!(live(&l, &s, 0), s.pte_value(0));
    assert_eq!(live(&l, &s, 8), 0);
    // Outside a section set_ptes() is fine in strict mode, and the default is not strict.
    l.set_ptes(s.va(8), s.pte_ptr(8), 2, |i| s.pte_value(1 + i as usize))
        .unwrap();
    assert_eq!(live(&l, &s, 9), s.pte_value(2));
    l.set_strict(false);
    l.enter().unwrap();
    l.enter().unwrap();
    assert_eq!(l.depth(), 2);
}

#[test]
fn is_active_follows_every_transition() {
    let (mut l, _) = std_setup();
    type Step = fn(&mut Lazy<DEFAULT_ENTRIES, DEFAULT_REQUESTS>) -> Result<(), MmuError>;
    let steps: [(&str, Step, bool, u32, bool); 10] = [
        ("enter", |l| l.enter(), true, 1, false),
        ("enter", |l| l.enter(), true, 2, false),
        ("pause", |l| l.pause(), false, 2, true),
        ("enter", |l| l.enter(), false, 2, true),
        ("pause", |l| l.pause(), false, 2, true),
        ("resume", |l| l.resume(), false, 2, true),
        ("resume", |l| l.resume(), true, 2, false),
        ("leave", |l| l.leave(), true, 1, false),
        ("flush", |l| l.flush(), true, 1, false),
        ("leave", |l| l.leave(), false, 0, false),
    ];
    for (i, (name, step, active, depth, paused)) in steps.into_iter().enumerate() {
        step(&mut l).unwrap();
        assert_eq!(
            (l.is_active(), l.depth(), l.is_paused()),
            (active, depth, paused),
            "after step {i} ({name})"
        );
    }
}

// ---- Coalescing and flushing ----

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

#[test]
fn an_mmuext_between_writes_splits_them_into_separate_entries() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.mmuext(invlpg(s.va(1))).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.mmuext(tlb_flush()).unwrap();
    l.mmuext(tlb_flush()).unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    assert_eq!((l.queued_entries(), l.queued_requests()), (6, 4));
    assert_eq!(calls(&l), 0);
    l.leave().unwrap();
    assert_eq!(calls(&l), 1);
    let Call::Multicall {
        calls: inner,
        result: 0,
    } = last_call(&l)
    else {
        panic!("expected one multicall: {:?}", last_call(&l));
    };
    let shape: Vec<&str> = inner
        .iter()
        .map(|c| match c {
            Call::MmuUpdate { reqs, .. } if reqs.len() == 2 => "mmu2",
            Call::MmuUpdate { reqs, .. } if reqs.len() == 1 => "mmu1",
            Call::MmuextOp { .. } => "ext",
            _ => "other",
        })
        .collect();
    assert_eq!(shape, ["mmu2", "ext", "mmu1", "ext", "ext", "mmu1"]);
    assert!(inner.iter().all(|c| c.result() == 0));
    for slot in 0..4 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
    assert_eq!(l.hypervisor().invlpgs, [s.va(1)]);
    assert_eq!(l.hypervisor().tlb_flushes, 2);
    let c = l.counters();
    assert_eq!(
        (c.hypercalls, c.multicalls, c.multicall_entries, c.other_ops),
        (1, 1, 6, 3)
    );
}

#[test]
fn a_single_entry_flush_is_the_plain_hypercall() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    l.mmuext(tlb_flush()).unwrap();
    l.flush().unwrap();
    assert!(matches!(last_call(&l), Call::MmuextOp { ops, result: 0, .. } if ops.len() == 1));
    let val = s.pte_value(4);
    l.update_va_mapping(s.va(7), val, UVMF_INVLPG).unwrap();
    l.flush().unwrap();
    assert_eq!(
        last_call(&l),
        &Call::UpdateVaMapping {
            va: s.va(7),
            val,
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
    assert_eq!(live(&l, &s, 16), 0);
    l.leave().unwrap();
    assert_eq!(live(&l, &s, 16), s.pte_value(16));
    assert_eq!(l.counters().flushes_for(FlushReason::Leave), 1);
}

#[test]
fn a_full_entry_buffer_flushes_as_full() {
    let (mut l, s) = setup::<4, 16>(1, 32);
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.mmuext(tlb_flush()).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.mmuext(tlb_flush()).unwrap();
    assert_eq!((l.queued_entries(), calls(&l)), (4, 0));
    // No room for a fifth entry, for a request or for another op.
    set(&mut l, &s, 2, 2).unwrap();
    assert_eq!(calls(&l), 1);
    assert!(matches!(last_call(&l), Call::Multicall { calls, .. } if calls.len() == 4));
    l.mmuext(tlb_flush()).unwrap();
    l.mmuext(tlb_flush()).unwrap();
    l.mmuext(tlb_flush()).unwrap();
    assert_eq!(calls(&l), 1);
    l.mmuext(tlb_flush()).unwrap();
    assert_eq!(calls(&l), 2);
    assert_eq!(l.counters().flushes_for(FlushReason::Full), 2);
    l.leave().unwrap();
    assert_eq!(l.hypervisor().tlb_flushes, 6);
    assert_eq!(live(&l, &s, 2), s.pte_value(2));
}

#[test]
fn a_read_flushes_only_if_that_entry_has_a_queued_write() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    set(&mut l, &s, 5, 1).unwrap();
    set(&mut l, &s, 6, 2).unwrap();
    assert_eq!(l.read_pte(s.pte_ptr(4)), 0);
    assert_eq!(l.read_pte(s.pte_ptr(512 + 5)), 0);
    assert_eq!(calls(&l), 0, "no hazard, no flush");
    assert_eq!(l.read_pte(s.pte_ptr(6)), s.pte_value(2));
    assert_eq!(calls(&l), 1, "the read of a queued entry flushed");
    assert_eq!(l.counters().flushes_for(FlushReason::ReadHazard), 1);
    assert!(l.is_active());
    assert_eq!(l.read_pte(s.pte_ptr(6)), s.pte_value(2));
    assert_eq!(calls(&l), 1, "nothing queued any more");
    // A queued update_va_mapping may change any entry: every read flushes it first.
    l.update_va_mapping(s.va(9), s.pte_value(3), 0).unwrap();
    assert_eq!(l.read_pte(s.pte_ptr(0)), 0);
    assert_eq!(calls(&l), 2);
    assert_eq!(live(&l, &s, 9), s.pte_value(3));
    // Queued pins and flushes change no entry.
    l.mmuext(tlb_flush()).unwrap();
    l.read_pte(s.pte_ptr(9));
    assert_eq!(calls(&l), 2);
    l.leave().unwrap();
    assert_eq!(l.counters().flushes_for(FlushReason::ReadHazard), 2);
}

// ---- set_ptes() ----

#[test]
fn set_ptes_contract_violations_queue_nothing_and_keep_the_queue() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    let v = |i: u64| s.pte_value(1 + i as usize);
    let cases = [
        (s.va(10), s.pte_ptr(10), 0, SetPtesRule::ZeroCount),
        (
            s.va(10) + 8,
            s.pte_ptr(10),
            1,
            SetPtesRule::UnalignedAddress { addr: s.va(10) + 8 },
        ),
        (
            s.va(10),
            s.pte_ptr(10) + 4,
            1,
            SetPtesRule::UnalignedPtep {
                ptep: s.pte_ptr(10) + 4,
            },
        ),
        (
            s.va(10),
            s.pte_ptr(11),
            1,
            SetPtesRule::PtepMismatch {
                addr_index: 10,
                ptep_index: 11,
            },
        ),
        (
            s.va(510),
            s.pte_ptr(510),
            3,
            SetPtesRule::CrossesTable {
                first_index: 510,
                nr: 3,
            },
        ),
    ];
    for (addr, ptep, nr, rule) in cases {
        assert_eq!(
            l.set_ptes(addr, ptep, nr, v),
            Err(MmuError::SetPtes(rule)),
            "{rule}"
        );
        assert_eq!((l.queued_entries(), l.queued_requests()), (1, 1), "{rule}");
        assert_eq!(l.depth(), 1, "{rule}");
    }
    assert_eq!(calls(&l), 0);
    // The last two entries of a table are fine.
    l.set_ptes(s.va(510), s.pte_ptr(510), 2, v).unwrap();
    l.leave().unwrap();
    assert_eq!(live(&l, &s, 0), s.pte_value(0));
    assert_eq!(live(&l, &s, 511), s.pte_value(2));
    assert_eq!(live(&l, &s, 512), 0);
    assert_eq!(live(&l, &s, 10), 0);
}

#[test]
fn set_ptes_batches_its_writes_unless_paused() {
    let (mut l, s) = std_setup();
    let v = |i: u64| s.pte_value(i as usize);
    l.set_ptes(s.va(100), s.pte_ptr(100), 20, v).unwrap();
    assert_eq!(calls(&l), 1, "outside lazy mode: one hypercall for all");
    assert!(mmu_call(20)(last_call(&l)));
    assert!(!l.is_active());

    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.set_ptes(s.va(200), s.pte_ptr(200), 5, v).unwrap();
    assert_eq!(calls(&l), 2, "inside: its (nested) leave flushes");
    assert!(mmu_call(6)(last_call(&l)));
    assert!(l.is_active());

    l.pause().unwrap();
    l.set_ptes(s.va(300), s.pte_ptr(300), 3, v).unwrap();
    assert_eq!(calls(&l), 5, "paused: one hypercall per entry");
    l.resume().unwrap();
    l.leave().unwrap();
    for i in 0..20 {
        assert_eq!(live(&l, &s, 100 + i), s.pte_value(i));
    }
    assert_eq!(live(&l, &s, 204), s.pte_value(4));
    assert_eq!(live(&l, &s, 302), s.pte_value(2));
}

// ---- Errors ----

#[test]
fn a_refused_request_mid_batch_is_named_and_everything_else_takes_effect() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    // Xen never lets a guest map one of its page tables writable (get_page_from_l1e: -EBUSY).
    let bad = Space::pte(table, Space::DATA_FLAGS);
    l.enter().unwrap();
    for slot in 0..3 {
        set(&mut l, &s, slot, slot).unwrap();
    }
    l.set_pte(s.pte_ptr(3), bad, s.va(3)).unwrap();
    set(&mut l, &s, 4, 4).unwrap();
    set(&mut l, &s, 5, 5).unwrap();
    l.mmuext(invlpg(s.va(3))).unwrap();
    for slot in 512..515 {
        set(&mut l, &s, slot, slot - 500).unwrap();
    }
    assert_eq!(l.queued_entries(), 3);
    let Err(MmuError::Flush(failure)) = l.leave() else {
        panic!("the flush must report the refused request");
    };
    assert_eq!(failure.reason, FlushReason::Leave);
    assert_eq!(failure.count, 1);
    assert_eq!(
        failure.first,
        Rejected {
            entry: 0,
            request: 3,
            op: Entry::MmuUpdate { first: 0, count: 6 },
            va: s.va(3),
            ptr: s.pte_ptr(3),
            val: bad,
            error: XenError::Busy,
        }
    );
    assert_eq!(
        l.last_rejections().copied().collect::<Vec<_>>(),
        [failure.first]
    );
    let text = failure.to_string();
    assert!(text.contains("entry 0 request 3"), "{text}");
    assert!(text.contains("EBUSY"), "{text}");
    for slot in [0, 1, 2, 4, 5] {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot), "slot {slot}");
    }
    for slot in 512..515 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot - 500), "slot {slot}");
    }
    assert_eq!(live(&l, &s, 3), 0);
    assert_eq!(
        l.hypervisor().frame_info(table),
        Some(FrameInfo {
            ty: PageType::L1,
            count: 1,
            pinned: true
        })
    );
    assert_eq!(l.counters().rejected, 1);
    assert!(!l.is_active());
    l.hypervisor().check_refcounts();
}

#[test]
fn a_refused_request_in_a_later_entry_names_that_entry() {
    let (mut l, s) = std_setup();
    // An L2 entry must point at an L1 table; a frame mapped writable cannot become one
    // (_get_page_type: -EINVAL).
    set(&mut l, &s, 0, 0).unwrap();
    let l2_ptr = (s.l2 << 12) | (100 * 8);
    let bad = Space::pte(s.data[0], 0x67);
    l.enter().unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.mmuext(tlb_flush()).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.set_pte(l2_ptr, bad, 0).unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    let Err(MmuError::Flush(failure)) = l.leave() else {
        panic!("expected a flush failure");
    };
    assert_eq!(failure.count, 1);
    let r = failure.first;
    assert_eq!((r.entry, r.request), (2, 1));
    assert_eq!(
        (r.va, r.ptr, r.val, r.error),
        (0, l2_ptr, bad, XenError::Inval)
    );
    for slot in 0..4 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
    assert_eq!(l.hypervisor().entry(s.l2, 100), 0);
    l.hypervisor().check_refcounts();
}

#[test]
fn several_refusals_are_all_counted() {
    let (mut l, s) = setup::<4, 16>(1, 32);
    let table = pinned_l1(&mut l);
    let bad = Space::pte(table, Space::DATA_FLAGS);
    l.enter().unwrap();
    for slot in 0..12 {
        if slot % 2 == 0 {
            l.set_pte(s.pte_ptr(slot), bad, s.va(slot)).unwrap();
        } else {
            set(&mut l, &s, slot, slot).unwrap();
        }
    }
    let Err(MmuError::Flush(f)) = l.leave() else {
        panic!("expected a flush failure")
    };
    assert_eq!(f.count, 6);
    let requests: Vec<u32> = l.last_rejections().map(|r| r.request).collect();
    assert_eq!(requests, [0, 2, 4, 6, 8, 10]);
    assert_eq!(f.first.request, 0);
    for slot in 0..12 {
        let want = if slot % 2 == 0 { 0 } else { s.pte_value(slot) };
        assert_eq!(live(&l, &s, slot), want);
    }
    assert!(
        f.to_string()
            .starts_with("6 request(s) rejected in a leave flush; first: entry 0 request 0")
    );
}

#[test]
fn an_immediate_refusal_is_reported() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let bad = Space::pte(table, Space::DATA_FLAGS);
    let r = l.set_pte(s.pte_ptr(9), bad, s.va(9));
    let Err(MmuError::Immediate(r)) = r else {
        panic!("expected an immediate refusal: {r:?}")
    };
    assert_eq!(
        (r.entry, r.request, r.va, r.ptr, r.val, r.error),
        (0, 0, s.va(9), s.pte_ptr(9), bad, XenError::Busy)
    );
    // Read-only is fine: Xen allows read-only mappings of page tables.
    l.set_pte(s.pte_ptr(9), bad & !RW, s.va(9)).unwrap();
    assert_eq!(live(&l, &s, 9), bad & !RW);
}

#[test]
fn a_rejected_multicall_falls_back_to_one_hypercall_per_entry() {
    let (mut l, s) = std_setup();
    l.hypervisor_mut().multicall_limit = 1;
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.mmuext(invlpg(s.va(1))).unwrap();
    set(&mut l, &s, 2, 2).unwrap();
    l.update_va_mapping(s.va(3), s.pte_value(3), 0).unwrap();
    assert_eq!(l.leave(), Err(MmuError::MulticallRejected(XenError::Inval)));
    let log = &l.hypervisor().log;
    assert_eq!(log.len(), 5);
    assert!(
        matches!(&log[0], Call::Multicall { calls, result } if calls.is_empty() && *result == -22)
    );
    assert!(mmu_call(2)(&log[1]));
    assert!(
        matches!(&log[2], Call::MmuextOp { ops, result: 0, .. } if ops == &[(MMUEXT_INVLPG_LOCAL, s.va(1))])
    );
    assert!(mmu_call(1)(&log[3]));
    assert!(matches!(&log[4], Call::UpdateVaMapping { result: 0, .. }));
    for slot in 0..4 {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
    assert_eq!(l.hypervisor().counts.rejected_multicalls, 1);
    assert_eq!(l.counters().hypercalls, 5);
}

#[test]
fn a_rejected_multicall_still_names_refused_requests() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    l.hypervisor_mut().multicall_limit = 0;
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.mmuext(tlb_flush()).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.set_pte(s.pte_ptr(2), Space::pte(table, Space::DATA_FLAGS), s.va(2))
        .unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    let Err(MmuError::Flush(f)) = l.leave() else {
        panic!("expected a flush failure")
    };
    assert_eq!(f.count, 1);
    let r = f.first;
    assert_eq!((r.entry, r.request, r.error), (2, 1, XenError::Busy));
    for slot in [0, 1, 3] {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
}

/// Xen runs every entry of a multicall, so the requests a refusal held up run after the later
/// entries did. They must not undo a later write to the same entry, nor land after a later
/// invalidation of their mapping.
#[test]
fn requests_held_up_by_a_refusal_do_not_overtake_later_entries() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let bad = Space::pte(table, Space::DATA_FLAGS);
    l.enter().unwrap();
    l.set_pte(s.pte_ptr(0), bad, s.va(0)).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.mmuext(invlpg(s.va(1))).unwrap();
    set(&mut l, &s, 1, 2).unwrap();
    l.update_va_mapping(s.va(4), s.pte_value(4), 0).unwrap();
    set(&mut l, &s, 4, 5).unwrap();
    l.update_va_mapping(s.va(1), s.pte_value(3), 0).unwrap();
    let Err(MmuError::Flush(f)) = l.leave() else {
        panic!("expected a flush failure")
    };
    assert_eq!(f.count, 1, "{f}");
    assert_eq!(live(&l, &s, 0), 0);
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
    let flat: Vec<Call> = l
        .hypervisor()
        .log
        .iter()
        .flat_map(|c| match c {
            Call::Multicall { calls, .. } => calls.clone(),
            c => vec![c.clone()],
        })
        .collect();
    let first_value = s.pte_value(1);
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
    l.hypervisor().check_refcounts();
}

#[test]
fn a_refused_update_va_mapping_in_a_multicall_names_its_address() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let bad = Space::pte(table, Space::DATA_FLAGS);
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.update_va_mapping(s.va(6), bad, 0).unwrap();
    let Err(MmuError::Flush(f)) = l.leave() else {
        panic!("expected a flush failure")
    };
    let r = f.first;
    assert_eq!(
        (r.entry, r.va, r.val, r.error),
        (1, s.va(6), bad, XenError::Busy)
    );
    // The same refusal issued directly names it the same way.
    let Err(MmuError::Immediate(direct)) = l.update_va_mapping(s.va(6), bad, 0) else {
        panic!("expected an immediate refusal")
    };
    assert_eq!((direct.va, direct.val), (r.va, r.val));
}

// ---- Properties over random programs ----

const TABLES: usize = 3;
const FRAMES: usize = 600;

/// Checks run during a stress program. `check_tables`: the live tables equal the shadow
/// after every leave. `check_hypercalls`: every hypercall is one the rules allow, and no other.
struct Checker<'a> {
    space: &'a Space,
    check_tables: bool,
    check_hypercalls: bool,
    mark: usize,
    active: bool,
    paused: bool,
    /// The queue before the op: requests, entries, and whether the last entry is an
    /// `mmu_update` (a write then coalesces into it).
    queued: usize,
    entries: usize,
    tail_update: bool,
    /// Hypercalls made again after a refusal held up later requests, on top of the batches.
    reissues: usize,
}

impl<'a> Checker<'a> {
    fn new(space: &'a Space, check_tables: bool, check_hypercalls: bool) -> Self {
        Checker {
            space,
            check_tables,
            check_hypercalls,
            mark: 0,
            active: false,
            paused: false,
            queued: 0,
            entries: 0,
            tail_update: false,
            reissues: 0,
        }
    }

    /// The hypercalls `op` made (`calls`), against what it may make given the state before it.
    fn check_calls<const E: usize, const R: usize>(
        &mut self,
        op: &Op,
        calls: &[Call],
    ) -> Result<(), String> {
        let reissues = &mut self.reissues;
        let mut flush = |calls: &[Call], entries: usize, requests: usize| {
            let made = flush_calls(calls, entries, requests)?;
            *reissues += made.saturating_sub(1);
            Ok::<usize, String>(made)
        };
        let (entries, queued) = (self.entries, self.queued);
        let one = |want: &dyn Fn(&Call) -> bool| match calls {
            [c] if want(c) => Ok(1),
            _ => Err("expected exactly one hypercall for the op itself".to_string()),
        };
        let made = match *op {
            Op::Enter | Op::Resume => 0,
            // While paused the queue is empty and leave does nothing.
            Op::Leave | Op::Flush => flush(calls, entries, queued)?,
            Op::Pause if self.active => flush(calls, entries, queued)?,
            Op::Pause => 0,
            // In a lazy section a write flushes only when the batch has no room for it.
            Op::SetPte { .. } | Op::Clear { .. } | Op::Bad { .. } if self.active => {
                if queued < R && (self.tail_update || entries < E) {
                    0
                } else {
                    flush(calls, entries, queued)?
                }
            }
            Op::FlushTlb | Op::Invlpg { .. } if self.active => {
                if entries < E {
                    0
                } else {
                    flush(calls, entries, queued)?
                }
            }
            Op::SetPte { .. } | Op::Clear { .. } | Op::Bad { .. } => {
                one(&|c| matches!(c, Call::MmuUpdate { reqs, .. } if reqs.len() == 1))?
            }
            Op::FlushTlb => one(
                &|c| matches!(c, Call::MmuextOp { ops, .. } if ops == &[(MMUEXT_TLB_FLUSH_LOCAL, 0)]),
            )?,
            Op::Invlpg { slot } => {
                let va = self.space.va(slot);
                one(
                    &|c| matches!(c, Call::MmuextOp { ops, .. } if ops == &[(MMUEXT_INVLPG_LOCAL, va)]),
                )?
            }
            // Paused: one hypercall per entry.
            Op::SetPtes { nr, .. } if self.paused => {
                if !calls
                    .iter()
                    .all(|c| matches!(c, Call::MmuUpdate { reqs, .. } if reqs.len() == 1))
                {
                    return Err(format!("a paused set_ptes() batched: {calls:?}"));
                }
                nr
            }
            // A flush whenever the batch has no room for the next request, then its own leave
            // flushes the rest.
            Op::SetPtes { nr, .. } => {
                let (mut e, mut q, mut tail) = (entries, queued, self.tail_update);
                let mut made = 0;
                for _ in 0..nr {
                    if !(q < R && (tail || e < E)) {
                        made += flush(&calls[made..], e, q)?;
                        (e, q, tail) = (0, 0, false);
                    }
                    if !tail {
                        e += 1;
                        tail = true;
                    }
                    q += 1;
                }
                made + flush(&calls[made..], e, q)?
            }
            // A read flushes only a batch holding a write to the entry it reads.
            Op::Read { slot } if self.active && !calls.is_empty() => {
                let ptr = self.space.pte_ptr(slot);
                if !calls[0].requests().iter().any(|&(p, _)| p & !7 == ptr) {
                    return Err(format!("a read of {ptr:#x} flushed: {:?}", calls[0]));
                }
                flush(calls, entries, queued)?
            }
            Op::Read { .. } => 0,
        };
        if made == calls.len() {
            Ok(())
        } else {
            let sizes: Vec<usize> = calls.iter().map(|c| c.requests().len()).collect();
            Err(format!(
                "hypercalls not allowed here (active {}, paused {}, {queued} requests in {entries} entries queued): {sizes:?} requests: {calls:?}",
                self.active, self.paused
            ))
        }
    }
}

/// Check that `calls` begin with the flush of a batch of `entries` entries holding `requests`
/// requests, and return how many calls that flush made: the batch itself (one multicall, or the
/// plain hypercall for a single entry), then, only if a refused request held up the requests
/// behind it, everything from those on again in queue order, one hypercall each (with another
/// `mmu_update` after each refusal that holds up more). Pins that succeeded are not repeated.
fn flush_calls(calls: &[Call], entries: usize, requests: usize) -> Result<usize, String> {
    if entries == 0 {
        return Ok(0);
    }
    let batch = match calls.first() {
        Some(Call::Multicall { calls, result: 0 }) if entries > 1 => calls.clone(),
        Some(c @ (Call::MmuUpdate { .. } | Call::MmuextOp { .. })) if entries == 1 => {
            vec![c.clone()]
        }
        c => {
            return Err(format!(
                "expected the flush of {entries} entries ({requests} requests), found {c:?}"
            ));
        }
    };
    let total: usize = batch.iter().map(|c| c.requests().len()).sum();
    let plain = batch
        .iter()
        .all(|c| matches!(c, Call::MmuUpdate { .. } | Call::MmuextOp { .. }));
    if batch.len() != entries || total != requests || !plain {
        return Err(format!(
            "expected a batch of {entries} entries and {requests} requests, found {batch:?}"
        ));
    }
    let holds_up = |c: &Call| matches!(c, Call::MmuUpdate { reqs, result, done } if *result < 0 && *done as usize + 1 < reqs.len());
    let Some(at) = batch.iter().position(holds_up) else {
        return Ok(1);
    };
    let Call::MmuUpdate { reqs, done, .. } = &batch[at] else {
        unreachable!()
    };
    let mut replay = vec![Call::MmuUpdate {
        reqs: reqs[*done as usize + 1..].to_vec(),
        result: 0,
        done: 0,
    }];
    for c in &batch[at + 1..] {
        match c {
            Call::MmuextOp { ops, result, .. }
                if *result >= 0 && ops.iter().all(|&(cmd, _)| cmd <= MMUEXT_UNPIN_TABLE) => {}
            c => replay.push(c.clone()),
        }
    }
    let mut made = 1;
    for mut want in replay {
        loop {
            let found = calls.get(made);
            made += 1;
            match (&want, found) {
                (Call::MmuUpdate { reqs: w, .. }, Some(Call::MmuUpdate { reqs, result, done }))
                    if w == reqs =>
                {
                    if *result < 0 && *done as usize + 1 < reqs.len() {
                        // Refused again before its last request: the rest goes once more.
                        want = Call::MmuUpdate {
                            reqs: reqs[*done as usize + 1..].to_vec(),
                            result: 0,
                            done: 0,
                        };
                        continue;
                    }
                }
                (Call::MmuextOp { ops: w, .. }, Some(Call::MmuextOp { ops, .. })) if w == ops => {}
                _ => {
                    return Err(format!(
                        "after a held-up refusal in {:?}, expected the replay of {want:?}, found {found:?}",
                        batch[at]
                    ));
                }
            }
            break;
        }
    }
    Ok(made)
}

impl<const E: usize, const R: usize> Observer<Model, E, R> for Checker<'_> {
    fn before_op(&mut self, _: usize, _: &Op, lazy: &Lazy<E, R>, _: &Shadow) {
        self.mark = lazy.hypervisor().log.len();
        self.active = lazy.is_active();
        self.paused = lazy.is_paused();
        self.queued = lazy.queued_requests();
        self.entries = lazy.queued_entries();
    }

    fn after_op(
        &mut self,
        _: usize,
        op: &Op,
        lazy: &mut Lazy<E, R>,
        _: &Shadow,
    ) -> Result<(), String> {
        if self.check_hypercalls {
            self.check_calls::<E, R>(op, &lazy.hypervisor().log[self.mark..])?;
        }
        self.tail_update = match op {
            _ if lazy.queued_entries() == 0 => false,
            Op::SetPte { .. } | Op::Clear { .. } | Op::Bad { .. } if self.active => true,
            Op::FlushTlb | Op::Invlpg { .. } if self.active => false,
            _ => self.tail_update,
        };
        Ok(())
    }

    fn after_leave(&mut self, lazy: &mut Lazy<E, R>, shadow: &Shadow) -> Result<(), String> {
        if !self.check_tables {
            return Ok(());
        }
        stress::compare(lazy, self.space, shadow, self.space.slots())?;
        // The entries beyond those the shadow covers must still be clear.
        let model = lazy.hypervisor();
        for slot in shadow.len()..self.space.slots() {
            let found = model.read_pte(self.space.pte_ptr(slot));
            if found != 0 {
                return Err(format!("slot {slot}: {found:#x}, expected 0"));
            }
        }
        Ok(())
    }
}

fn program(seed: u64, ops: usize, depth: u32, opts: GenOptions) -> Vec<Op> {
    stress::generate_with(seed, ops, depth, TABLES * 512, FRAMES, opts)
}

/// (a) After every leave the tables equal the eager reference. With refusals, the runner also
/// checks that each is reported once, by the call that ends the batching.
fn tables_match_after_every_leave<const E: usize, const R: usize>(
    seed: u64,
    ops: usize,
    depth: u32,
    opts: GenOptions,
) -> Result<(), TestCaseError> {
    let (mut l, s) = setup::<E, R>(TABLES, FRAMES);
    let prog = program(seed, ops, depth, opts);
    let mut checker = Checker::new(&s, true, false);
    let stats = stress::run_with(&mut l, &s, &prog, &mut checker).map_err(TestCaseError::fail)?;
    prop_assert_eq!(stats.reported_refusals, stats.refused_writes as u64);
    if stats.refused_writes > 0 {
        prop_assert_eq!(stats.refusal_error, Some(XenError::Busy));
    }
    prop_assert_eq!(
        l.counters().rejected,
        stats.refused_writes as u64,
        "Xen refused exactly the bad writes"
    );
    l.hypervisor().check_refcounts();
    Ok(())
}

/// (b) No hypercall inside a lazy section but for a full buffer or a read hazard (and the
/// reissues after a refusal in those flushes), or from ops that flush (leave, flush, pause,
/// and set_ptes() with its own leave).
fn no_hypercalls_inside_lazy_sections<const E: usize, const R: usize>(
    seed: u64,
    ops: usize,
    depth: u32,
    opts: GenOptions,
) -> Result<(), TestCaseError> {
    let (mut l, s) = setup::<E, R>(TABLES, FRAMES);
    let prog = program(seed, ops, depth, opts);
    let mut checker = Checker::new(&s, false, true);
    let stats = stress::run_with(&mut l, &s, &prog, &mut checker).map_err(TestCaseError::fail)?;
    let allowed = stats.flushes_for(FlushReason::Full)
        + stats.flushes_for(FlushReason::ReadHazard)
        + checker.reissues as u64;
    prop_assert!(
        stats.lazy_hypercalls <= allowed,
        "{} hypercalls inside lazy sections, {allowed} full/read-hazard flushes and reissues",
        stats.lazy_hypercalls
    );
    Ok(())
}

/// (c) Hypercalls for N batched writes and T batched TLB ops: at most ceil(N / R) full request
/// buffers plus ceil(T / (E / 2)) full entry buffers (entries alternate at worst, so a full one
/// holds at least E / 2 TLB ops), plus one per op that forces a flush, plus one per immediate
/// write or TLB op, plus the reissues after refusals (which the checker matches to the replay
/// the refusals call for).
fn hypercalls_are_bounded<const E: usize, const R: usize>(
    seed: u64,
    ops: usize,
    depth: u32,
    opts: GenOptions,
) -> Result<(), TestCaseError> {
    let (mut l, s) = setup::<E, R>(TABLES, FRAMES);
    let prog = program(seed, ops, depth, opts);
    let mut checker = Checker::new(&s, false, true);
    let stats = stress::run_with(&mut l, &s, &prog, &mut checker).map_err(TestCaseError::fail)?;
    let set_ptes = prog
        .iter()
        .filter(|op| matches!(op, Op::SetPtes { .. }))
        .count();
    let forced = stats.leaves + stats.flushes + stats.pauses + stats.hazard_reads + set_ptes;
    let full = stats.batched_writes.div_ceil(R) + stats.batched_tlb_ops.div_ceil(E / 2);
    let immediate = stats.immediate_writes + stats.tlb_ops - stats.batched_tlb_ops;
    let bound = full + forced + immediate + checker.reissues;
    let made = l.hypervisor().counts.hypercalls();
    prop_assert!(
        made as usize <= bound,
        "{made} hypercalls for {} batched writes (capacity {R}), {} batched TLB ops ({E} entries), {forced} forced flushes, {immediate} immediate ops, {} reissues",
        stats.batched_writes,
        stats.batched_tlb_ops,
        checker.reissues
    );
    prop_assert_eq!(
        made,
        stats.hypercalls,
        "the lazy layer's count agrees with Xen's"
    );
    Ok(())
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const PLAIN: GenOptions = GenOptions {
    refusals: false,
    tlb_ops: false,
};

/// One proptest per line: a property, the queue's (entries, requests), the kind of programs.
macro_rules! property_tests {
    ($($name:ident: $property:ident($entries:expr, $requests:expr, $programs:expr);)*) => {
        proptest! {
            #![proptest_config(config(96))]
            $(
                #[test]
                fn $name(seed in any::<u64>(), depth in 0u32..=8, ops in 1usize..500) {
                    $property::<{ $entries }, { $requests }>(seed, ops, depth, $programs)?;
                }
            )*
        }
    };
}

// Plain programs, then the same properties over programs with refused writes and queued TLB
// ops: the error path (report, then replay in queue order) under every queue size.
property_tests! {
    tables_match_shadow_small_queue: tables_match_after_every_leave(4, 16, PLAIN);
    tables_match_shadow_linux_queue: tables_match_after_every_leave(LINUX_ENTRIES, LINUX_REQUESTS, PLAIN);
    tables_match_shadow_default_queue: tables_match_after_every_leave(DEFAULT_ENTRIES, DEFAULT_REQUESTS, PLAIN);
    no_stray_hypercalls_small_queue: no_hypercalls_inside_lazy_sections(4, 16, PLAIN);
    no_stray_hypercalls_default_queue: no_hypercalls_inside_lazy_sections(DEFAULT_ENTRIES, DEFAULT_REQUESTS, PLAIN);
    hypercalls_bounded_small_queue: hypercalls_are_bounded(4, 16, PLAIN);
    hypercalls_bounded_default_queue: hypercalls_are_bounded(DEFAULT_ENTRIES, DEFAULT_REQUESTS, PLAIN);
    tables_match_shadow_with_refusals_small_queue: tables_match_after_every_leave(4, 16, GenOptions::ALL);
    tables_match_shadow_with_refusals_linux_queue: tables_match_after_every_leave(LINUX_ENTRIES, LINUX_REQUESTS, GenOptions::ALL);
    tables_match_shadow_with_refusals_default_queue: tables_match_after_every_leave(DEFAULT_ENTRIES, DEFAULT_REQUESTS, GenOptions::ALL);
    no_stray_hypercalls_with_refusals_small_queue: no_hypercalls_inside_lazy_sections(4, 16, GenOptions::ALL);
    no_stray_hypercalls_with_refusals_linux_queue: no_hypercalls_inside_lazy_sections(LINUX_ENTRIES, LINUX_REQUESTS, GenOptions::ALL);
    no_stray_hypercalls_with_refusals_default_queue: no_hypercalls_inside_lazy_sections(DEFAULT_ENTRIES, DEFAULT_REQUESTS, GenOptions::ALL);
    hypercalls_bounded_with_refusals_small_queue: hypercalls_are_bounded(4, 16, GenOptions::ALL);
    hypercalls_bounded_with_refusals_linux_queue: hypercalls_are_bounded(LINUX_ENTRIES, LINUX_REQUESTS, GenOptions::ALL);
    hypercalls_bounded_with_refusals_default_queue: hypercalls_are_bounded(DEFAULT_ENTRIES, DEFAULT_REQUESTS, GenOptions::ALL);
}

// ---- The generator and runner themselves ----

#[test]
fn generated_programs_are_balanced_and_in_range() {
    for (seed, opts) in (0..300).flat_map(|s| [(s, PLAIN), (s, GenOptions::ALL)]) {
        let depth = (seed % 9) as u32;
        let slots = 1 + (seed as usize * 37) % 1500;
        let frames = 1 + (seed as usize * 11) % 700;
        let ops = (seed as usize * 7) % 500;
        let prog = stress::generate_with(seed, ops, depth, slots, frames, opts);
        assert_eq!(prog.len(), ops, "seed {seed}");
        assert_eq!(
            prog,
            stress::generate_with(seed, ops, depth, slots, frames, opts)
        );
        let mut open = Vec::new();
        for op in &prog {
            match *op {
                Op::Enter | Op::Pause => {
                    open.push(*op);
                    assert!(open.len() as u32 <= depth, "seed {seed}: too deep");
                }
                Op::Leave => assert_eq!(open.pop(), Some(Op::Enter), "seed {seed}"),
                Op::Resume => assert_eq!(open.pop(), Some(Op::Pause), "seed {seed}"),
                Op::SetPte { slot, frame } => assert!(slot < slots && frame < frames),
                Op::Clear { slot } | Op::Read { slot } | Op::Bad { slot } | Op::Invlpg { slot } => {
                    assert!(slot < slots)
                }
                Op::SetPtes { slot, nr, frame } => {
                    assert!(nr >= 1 && slot + nr <= slots && frame + nr <= frames);
                    assert_eq!(
                        slot / 512,
                        (slot + nr - 1) / 512,
                        "seed {seed}: crosses a table"
                    );
                }
                Op::Flush | Op::FlushTlb => {}
            }
        }
        assert!(open.is_empty(), "seed {seed}: unbalanced");
    }
}

#[test]
fn generated_programs_cover_every_kind_of_op() {
    let prog = stress::generate(7, 5000, 8, 1024, 600);
    let has = |f: fn(&Op) -> bool| prog.iter().any(f);
    assert!(has(|o| matches!(o, Op::Enter)) && has(|o| matches!(o, Op::Pause)));
    assert!(has(|o| matches!(o, Op::SetPte { .. })) && has(|o| matches!(o, Op::Clear { .. })));
    assert!(has(|o| matches!(o, Op::SetPtes { nr, .. } if *nr > 64)));
    assert!(has(|o| matches!(o, Op::Flush)) && has(|o| matches!(o, Op::Read { .. })));
    assert!(
        stress::generate(7, 100, 0, 10, 10)
            .iter()
            .all(|o| !matches!(o, Op::Enter | Op::Pause))
    );
    // Degenerate layouts still give balanced programs.
    assert_eq!(stress::generate(1, 50, 3, 0, 0).len(), 50);
    assert_eq!(
        stress::generate_with(1, 50, 3, 0, 0, GenOptions::ALL).len(),
        50
    );

    // The extra ops only when asked for, each on its own.
    let bad = |o: &Op| matches!(o, Op::Bad { .. });
    let tlb = |o: &Op| matches!(o, Op::FlushTlb | Op::Invlpg { .. });
    assert!(!prog.iter().any(|o| bad(o) || tlb(o)));
    let with = |opts| stress::generate_with(7, 5000, 8, 1024, 600, opts);
    let all = with(GenOptions::ALL);
    assert!(all.iter().any(bad));
    assert!(all.iter().any(|o| matches!(o, Op::FlushTlb)));
    assert!(all.iter().any(|o| matches!(o, Op::Invlpg { .. })));
    let refusals = with(GenOptions {
        refusals: true,
        tlb_ops: false,
    });
    assert!(refusals.iter().any(bad) && !refusals.iter().any(tlb));
    let tlb_only = with(GenOptions {
        refusals: false,
        tlb_ops: true,
    });
    assert!(tlb_only.iter().any(tlb) && !tlb_only.iter().any(bad));
    assert_eq!(with(PLAIN), prog, "no options: generate()'s program");
}

#[test]
fn rng_is_deterministic_and_in_range() {
    let mut a = stress::Rng::new(42);
    let mut b = stress::Rng::new(42);
    let mut c = stress::Rng::new(43);
    let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
    let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
    let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
    assert_eq!(xs, ys);
    assert_ne!(xs, zs);
    let mut hits = [0usize; 7];
    for _ in 0..7000 {
        hits[a.below(7)] += 1;
    }
    assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
    assert_eq!(stress::Rng::new(0).below(1), 0);
}

/// Changes slot 3 behind the runner's back after op `at`.
struct Tamper<'a> {
    space: &'a Space,
    at: usize,
}

impl<const E: usize, const R: usize> Observer<Model, E, R> for Tamper<'_> {
    fn after_op(&mut self, i: usize, _: &Op, l: &mut Lazy<E, R>, _: &Shadow) -> Result<(), String> {
        if i == self.at {
            let req = hypercalls::abi::pt_update(self.space.pte_ptr(3), 0);
            l.hypervisor_mut().mmu_update(&[req]).unwrap();
        }
        Ok(())
    }
}

#[test]
fn run_reports_a_stale_read_and_compare_names_the_slot() {
    let (mut l, s) = std_setup();
    let prog = [Op::SetPte { slot: 3, frame: 1 }, Op::Read { slot: 3 }];
    let err = stress::run_with(&mut l, &s, &prog, &mut Tamper { space: &s, at: 0 }).unwrap_err();
    assert!(
        err.starts_with("op 1 (Read { slot: 3 }): read 0x0"),
        "{err}"
    );
    // The shadow starts from the live tables, whatever they hold.
    let stats = stress::run(&mut l, &s, &prog[1..], |_, _| Ok(())).unwrap();
    assert_eq!((stats.ops, stats.writes, stats.reads), (1, 0, 1));

    let prog = [Op::Enter, Op::SetPte { slot: 2, frame: 2 }, Op::Leave];
    let mut shadow_at_leave = None;
    stress::run(&mut l, &s, &prog, |_, sh| {
        shadow_at_leave = Some(sh.clone());
        Ok(())
    })
    .unwrap();
    let shadow = shadow_at_leave.unwrap();
    assert_eq!(shadow.len(), 3);
    assert_eq!(shadow.get(2), s.pte_value(2));
    assert_eq!(stress::compare(&l, &s, &shadow, 100), Ok(()));
    set(&mut l, &s, 2, 5).unwrap();
    let msg = stress::compare(&l, &s, &shadow, 100).unwrap_err();
    assert!(msg.starts_with("slot 2 "), "{msg}");
    assert!(msg.contains(&format!("{:#x}", s.pte_ptr(2))), "{msg}");
    // A failing hook stops the run and names the op.
    let err = stress::run(&mut l, &s, &prog, |_, _| Err("boom".into())).unwrap_err();
    assert!(
        err.contains("op 2 (Leave)") && err.contains("boom"),
        "{err}"
    );
}

#[test]
fn run_counts_what_it_did() {
    let (mut l, s) = setup::<4, 16>(1, 64);
    let prog = [
        Op::Enter,
        Op::Enter,
        Op::SetPte { slot: 0, frame: 0 },
        Op::Read { slot: 0 },
        Op::Read { slot: 1 },
        Op::SetPtes {
            slot: 8,
            nr: 20,
            frame: 1,
        },
        Op::Pause,
        Op::Clear { slot: 0 },
        Op::Resume,
        Op::Leave,
        Op::Flush,
        Op::Leave,
    ];
    let mut leaves = 0;
    let stats = stress::run(&mut l, &s, &prog, |l, sh| {
        leaves += 1;
        stress::compare(l, &s, sh, 64)
    })
    .unwrap();
    assert_eq!(leaves, 3, "two leaves and a set_ptes");
    assert_eq!(stats.ops, 12);
    assert_eq!(
        (stats.writes, stats.batched_writes, stats.immediate_writes),
        (22, 21, 1)
    );
    assert_eq!((stats.reads, stats.hazard_reads), (2, 1));
    assert_eq!((stats.enters, stats.leaves, stats.nested_leaves), (2, 2, 1));
    assert_eq!((stats.pauses, stats.flushes, stats.max_depth), (1, 1, 2));
    assert_eq!(stats.lazy_hypercalls, 1, "the read hazard");
    assert_eq!(stats.flushes_for(FlushReason::ReadHazard), 1);
    assert_eq!(stats.flushes_for(FlushReason::Full), 1);
    assert_eq!(stats.hypercalls, l.hypervisor().counts.hypercalls());
}

#[test]
fn run_checks_where_refusals_are_reported() {
    let (mut l, s) = setup::<4, 16>(1, 64);
    let mut prog = vec![
        Op::Bad { slot: 0 },
        Op::Enter,
        Op::SetPte { slot: 1, frame: 1 },
        Op::Bad { slot: 1 },
        Op::SetPte { slot: 2, frame: 2 },
        Op::Enter,
        Op::Bad { slot: 3 },
        Op::FlushTlb,
        Op::Leave,
        Op::Read { slot: 1 },
        Op::Flush,
        Op::Bad { slot: 4 },
        Op::Invlpg { slot: 4 },
        Op::Pause,
        Op::Bad { slot: 5 },
        Op::Resume,
        // Neither the read-hazard flush nor set_ptes()'s nested leave reports it.
        Op::Bad { slot: 6 },
        Op::Read { slot: 6 },
        Op::SetPtes {
            slot: 8,
            nr: 20,
            frame: 1,
        },
    ];
    // More than the error lists: the count covers them.
    prog.extend((0..10).map(|i| Op::Bad { slot: 40 + i }));
    prog.push(Op::Leave);
    let stats = stress::run(&mut l, &s, &prog, |l, sh| stress::compare(l, &s, sh, 64)).unwrap();
    assert_eq!((stats.refused_writes, stats.reported_refusals), (16, 16));
    assert_eq!(
        (
            stats.reported_by_leave,
            stats.reported_by_flush,
            stats.reported_by_pause,
            stats.reported_at_once
        ),
        (11, 2, 1, 2)
    );
    assert_eq!(stats.most_reported_by_one_call, 11);
    assert_eq!((stats.tlb_ops, stats.batched_tlb_ops), (2, 2));
    assert_eq!(stats.hazard_reads, 1);
    assert_eq!(l.counters().rejected, 16);
    assert_eq!(
        live(&l, &s, 1),
        s.pte_value(1),
        "the refused write changed nothing"
    );
    for slot in [0, 3, 4, 5, 6, 40, 49] {
        assert_eq!(live(&l, &s, slot), 0, "slot {slot}");
    }
}

/// A layout whose "bad" value Xen accepts.
struct Lenient<'a>(&'a Space);

impl Layout for Lenient<'_> {
    fn pte_ptr(&self, slot: usize) -> u64 {
        self.0.pte_ptr(slot)
    }
    fn va(&self, slot: usize) -> u64 {
        self.0.va(slot)
    }
    fn pte_value(&self, frame: usize) -> u64 {
        self.0.pte_value(frame)
    }
    fn bad_value(&self) -> u64 {
        self.0.pte_value(0)
    }
}

/// Queues a refused write behind the runner's back after op `at`.
struct Sneak<'a> {
    space: &'a Space,
    at: usize,
}

impl<const E: usize, const R: usize> Observer<Model, E, R> for Sneak<'_> {
    fn after_op(&mut self, i: usize, _: &Op, l: &mut Lazy<E, R>, _: &Shadow) -> Result<(), String> {
        if i == self.at {
            let s = self.space;
            l.set_pte(s.pte_ptr(9), s.bad_value(), s.va(9))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[test]
fn run_fails_on_a_missing_or_unexpected_refusal() {
    let (mut l, s) = std_setup();
    let prog = [Op::Enter, Op::Bad { slot: 0 }, Op::Leave];
    let err = stress::run(&mut l, &Lenient(&s), &prog, |_, _| Ok(())).unwrap_err();
    assert!(
        err.starts_with("op 2 (Leave): 0 refusal(s) reported, 1 refused write(s)"),
        "{err}"
    );
    let err = stress::run(&mut l, &Lenient(&s), &prog[1..2], |_, _| Ok(())).unwrap_err();
    assert!(err.contains("0 refusal(s) reported, 1 refused"), "{err}");

    let (mut l, s) = std_setup();
    let prog = [Op::Enter, Op::SetPte { slot: 0, frame: 0 }, Op::Leave];
    let err = stress::run_with(&mut l, &s, &prog, &mut Sneak { space: &s, at: 1 }).unwrap_err();
    assert!(
        err.starts_with("op 2 (Leave): 1 refusal(s) reported, 0 refused write(s)"),
        "{err}"
    );
}

/// Programs with refusals reach every reporting call, more refusals in one report than it
/// lists, and the replay after a held-up refusal.
#[test]
fn programs_with_refusals_exercise_the_error_path() {
    let mut total = stress::RunStats::default();
    let mut reissues = 0;
    for seed in 0..24 {
        let (mut l, s) = setup::<4, 16>(TABLES, FRAMES);
        let prog = program(seed, 400, (seed % 4) as u32 + 1, GenOptions::ALL);
        let mut checker = Checker::new(&s, false, true);
        let stats = stress::run_with(&mut l, &s, &prog, &mut checker).unwrap();
        total.reported_by_leave += stats.reported_by_leave;
        total.reported_by_flush += stats.reported_by_flush;
        total.reported_by_pause += stats.reported_by_pause;
        total.reported_at_once += stats.reported_at_once;
        total.most_reported_by_one_call = total
            .most_reported_by_one_call
            .max(stats.most_reported_by_one_call);
        reissues += checker.reissues;
    }
    assert!(total.reported_by_leave > 0 && total.reported_by_flush > 0);
    assert!(total.reported_by_pause > 0 && total.reported_at_once > 0);
    assert!(
        total.most_reported_by_one_call > MAX_REPORTED as u64,
        "{total:?}"
    );
    assert!(reissues > 0);
}

#[test]
fn no_hypercall_happens_between_enter_and_leave() {
    let (mut l, s) = std_setup();
    let before = calls(&l);
    l.enter().unwrap();
    for slot in 0..40 {
        set(&mut l, &s, slot, slot % 32).unwrap();
        l.read_pte(s.pte_ptr(slot + 100));
    }
    l.mmuext(tlb_flush()).unwrap();
    assert_eq!(calls(&l), before);
    l.leave().unwrap();
    assert_eq!(calls(&l), before + 1);
    assert_eq!(l.hypervisor().log[before].requests().len(), 40);
}

// ---- Where refusals are reported, and replay after a refusal ----

/// A refusal in a flush the caller did not ask for (full buffer, read hazard, nested leave) is
/// reported by the call that ends the batching, not by whichever call triggered the flush.
#[test]
fn refusals_of_implicit_flushes_are_reported_where_batching_ends() {
    let (mut l, s) = setup::<4, 4>(2, 32);
    let table = pinned_l1(&mut l);
    let bad = Space::pte(table, Space::DATA_FLAGS);
    l.enter().unwrap();
    l.set_pte(s.pte_ptr(0), bad, s.va(0)).unwrap();
    for slot in 1..4 {
        set(&mut l, &s, slot, slot).unwrap();
    }
    // The buffer is full: this write flushes the refused request, yet succeeds itself.
    assert_eq!(set(&mut l, &s, 4, 4), Ok(()));
    assert_eq!(l.counters().flushes_for(FlushReason::Full), 1);
    // A nested section (what set_ptes() opens) ends without handing over the outer refusal.
    assert_eq!(
        l.set_ptes(s.va(8), s.pte_ptr(8), 2, |i| s.pte_value(8 + i as usize)),
        Ok(())
    );
    let Err(MmuError::Flush(f)) = l.leave() else {
        panic!("the outermost leave must report the refusal")
    };
    assert_eq!(
        (f.count, f.reason, f.first.va),
        (1, FlushReason::Full, s.va(0))
    );
    for slot in (1..5).chain(8..10) {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot), "slot {slot}");
    }
    // Reported once: the next section starts clean.
    l.enter().unwrap();
    set(&mut l, &s, 5, 5).unwrap();
    assert_eq!(l.leave(), Ok(()));
}

/// A later entry that failed only because a refusal held up the requests before it is retried
/// in queue order: the pin of a frame whose writable mapping the held-up request removes.
#[test]
fn an_entry_that_failed_because_of_held_up_requests_is_retried() {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    let bad = Space::pte(table, Space::DATA_FLAGS);
    let frame = l.hypervisor_mut().alloc();
    // The frame is mapped writable at slot 3: it cannot become a page table until unmapped.
    l.set_pte(s.pte_ptr(3), Space::pte(frame, Space::DATA_FLAGS), s.va(3))
        .unwrap();
    l.enter().unwrap();
    l.set_pte(s.pte_ptr(0), bad, s.va(0)).unwrap();
    l.set_pte(s.pte_ptr(3), 0, s.va(3)).unwrap();
    l.mmuext(mmuext_mfn(MMUEXT_PIN_L1_TABLE, frame)).unwrap();
    let Err(MmuError::Flush(f)) = l.leave() else {
        panic!("expected the refusal of slot 0")
    };
    assert_eq!((f.count, f.first.entry, f.first.request), (1, 0, 0), "{f}");
    assert_eq!(live(&l, &s, 3), 0);
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
    let bad = Space::pte(table, Space::DATA_FLAGS);
    l.enter().unwrap();
    l.update_va_mapping(s.va(7), bad, 0).unwrap();
    set(&mut l, &s, 1, 1).unwrap();
    l.set_pte(s.pte_ptr(2), bad, s.va(2)).unwrap();
    set(&mut l, &s, 3, 3).unwrap();
    let Err(MmuError::Flush(f)) = l.leave() else {
        panic!("expected refusals")
    };
    let update_va_mappings = l
        .hypervisor()
        .log
        .iter()
        .flat_map(|c| match c {
            Call::Multicall { calls, .. } => calls.clone(),
            c => vec![c.clone()],
        })
        .filter(|c| matches!(c, Call::UpdateVaMapping { .. }))
        .count();
    assert_eq!(f.count, 2, "{f}");
    let listed: Vec<(u16, u32)> = l.last_rejections().map(|r| (r.entry, r.request)).collect();
    assert_eq!(listed, vec![(0, 0), (1, 1)]);
    assert_eq!(update_va_mappings, 1, "issued once, in the multicall");
    for slot in [1, 3] {
        assert_eq!(live(&l, &s, slot), s.pte_value(slot));
    }
}
