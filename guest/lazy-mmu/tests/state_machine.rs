//! The nesting state machine: enter/leave, pause/resume, strict mode, the nesting limit and
//! `leave_deferring`.

mod common;

use common::*;
use hypercalls::{Pte, XenError};
use lazy_mmu::program::Layout;
use lazy_mmu::{FlushReason, LazyState, MmuError, NESTING_LIMIT};

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
    assert_eq!(live(&l, &s, 0), Pte::NONE);
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
    assert_eq!(
        l.state(),
        LazyState {
            enable: 1,
            pause: 2
        }
    );
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
    l.leave_deferring().unwrap();
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
    assert_eq!(l.leave_deferring(), Err(MmuError::UnbalancedLeave));
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
    assert_eq!(l.state(), LazyState::default());
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
    assert_eq!(live(&l, &s, 8), Pte::NONE);
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
    type Step = fn(&mut Lazy) -> Result<(), MmuError>;
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
        assert_eq!(l.state().is_active(), active);
    }
}

/// Linux keeps both counts in a `u8`; a 256th level is an error, not a silent wrap to 0
/// (which would end batching with requests still queued).
#[test]
fn enter_and_pause_nest_at_most_255_deep() {
    let (mut l, s) = std_setup();
    assert_eq!(NESTING_LIMIT, 255);
    for _ in 0..NESTING_LIMIT {
        l.enter().unwrap();
    }
    set(&mut l, &s, 0, 0).unwrap();
    assert_eq!(l.enter(), Err(MmuError::NestingLimit { what: "enter" }));
    assert_eq!(l.depth(), NESTING_LIMIT);
    assert!(l.is_active());
    assert_eq!(l.queued_requests(), 1, "the failed enter touched nothing");
    for _ in 0..NESTING_LIMIT {
        l.pause().unwrap();
    }
    assert_eq!(l.pause(), Err(MmuError::NestingLimit { what: "pause" }));
    assert_eq!(l.state().pause, 255);
    for _ in 0..NESTING_LIMIT {
        l.resume().unwrap();
    }
    assert_eq!(l.resume(), Err(MmuError::UnbalancedResume));
    for _ in 0..NESTING_LIMIT {
        l.leave().unwrap();
    }
    assert_eq!(l.state(), LazyState::default());
    assert_eq!(live(&l, &s, 0), s.pte_value(0));
    let text = MmuError::NestingLimit { what: "enter" }.to_string();
    assert!(text.contains("255"), "{text}");
}

/// A section dropped on an error path leaves with `leave_deferring()`: it flushes like a leave
/// but keeps the refusals for the next call that reports.
#[test]
fn leave_deferring_keeps_refusals_for_the_next_report() {
    let (mut l, s, bad) = refusing_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    put(&mut l, &s, 1, bad).unwrap();
    assert_eq!(l.leave_deferring(), Ok(()));
    assert_eq!(l.state(), LazyState::default());
    assert_eq!(l.queued_entries(), 0, "it flushed");
    assert_eq!(live(&l, &s, 0), s.pte_value(0));
    assert_eq!(l.pending_refusals(), 1);
    assert_eq!(l.counters().flushes_for(FlushReason::Leave), 1);

    // Nested: a deferring leave flushes and stays lazy; the outermost leave reports both.
    l.enter().unwrap();
    l.enter().unwrap();
    put(&mut l, &s, 2, bad).unwrap();
    assert_eq!(l.leave_deferring(), Ok(()));
    assert_eq!(l.depth(), 1);
    assert_eq!(l.counters().flushes_for(FlushReason::NestedLeave), 1);
    assert_eq!(l.pending_refusals(), 2);
    let f = refused(l.leave());
    assert_eq!(f.count, 2);
    assert_eq!(f.flush, Some(FlushReason::Leave));
    assert_eq!(
        listed_requests(&l),
        [
            (Some(set_pte_request(&s, 1, bad)), XenError::Busy),
            (Some(set_pte_request(&s, 2, bad)), XenError::Busy),
        ]
    );
    assert_eq!(l.pending_refusals(), 0);
    // Reported once.
    assert_eq!(l.flush(), Ok(()));
    // Outside lazy mode a flush reports what a deferring leave kept.
    l.enter().unwrap();
    put(&mut l, &s, 3, bad).unwrap();
    l.leave_deferring().unwrap();
    let f = refused(l.flush());
    assert_eq!(
        (f.count, f.first.request),
        (1, Some(set_pte_request(&s, 3, bad)))
    );
}

/// `pause_deferring()` flushes like `pause()` but keeps the refusals for the section's leave.
#[test]
fn pause_deferring_keeps_refusals_for_the_leave() {
    let (mut l, s, bad) = refusing_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    put(&mut l, &s, 1, bad).unwrap();
    assert_eq!(l.pause_deferring(), Ok(()));
    assert!(l.is_paused());
    assert_eq!(l.queued_entries(), 0, "it flushed");
    assert_eq!(live(&l, &s, 0), s.pte_value(0));
    assert_eq!(l.pending_refusals(), 1);
    assert_eq!(l.counters().flushes_for(FlushReason::Pause), 1);
    // A nested pause does not flush again.
    assert_eq!(l.pause_deferring(), Ok(()));
    l.resume().unwrap();
    l.resume().unwrap();
    let f = refused(l.leave());
    assert_eq!(f.count, 1);
    assert_eq!(l.pending_refusals(), 0);
    // Outside a section it only counts the pause.
    assert_eq!(l.pause_deferring(), Ok(()));
    assert!(l.is_paused());
    l.resume().unwrap();
    assert_eq!(l.state(), LazyState::default());
}
