//! Linux's generic `set_ptes()`: its contract, batching, the paused path, and which frame each
//! entry gets.

mod common;

use std::cell::RefCell;

use common::*;
use hypercalls::{MachAddr, Pte, XenError};
use lazy_mmu::model::{Call, Space};
use lazy_mmu::program::Layout;
use lazy_mmu::{FlushReason, MmuError, SetPtesRule, check_set_ptes};
use x86_64::VirtAddr;

#[test]
fn set_ptes_contract_violations_queue_nothing_and_keep_the_queue() {
    let (mut l, s) = std_setup();
    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    let v = |i: u64| s.pte_value(1 + i as usize);
    let off = |a: MachAddr, by: u64| MachAddr::new(a.get() + by).unwrap();
    let cases = [
        (s.va(10), s.pte_ptr(10), 0, SetPtesRule::ZeroCount),
        (
            s.va(10) + 8u64,
            s.pte_ptr(10),
            1,
            SetPtesRule::UnalignedAddress {
                addr: (s.va(10) + 8u64).as_u64(),
            },
        ),
        (
            s.va(10),
            off(s.pte_ptr(10), 4),
            1,
            SetPtesRule::UnalignedPtep {
                ptep: off(s.pte_ptr(10), 4),
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
        assert_eq!(check_set_ptes(addr, ptep, nr), Err(rule), "{rule}");
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
    assert_eq!(live(&l, &s, 512), Pte::NONE);
    assert_eq!(live(&l, &s, 10), Pte::NONE);
}

/// Regression: the old check computed `ptep_index + nr`, which overflows for a huge `nr`
/// (a panic in debug builds, a wrap to a small number that passes the check in release, and
/// then `nr` writes off the end of the table).
#[test]
fn a_huge_count_crosses_the_table_instead_of_overflowing() {
    let mfn = 0x1234u64;
    let addr = VirtAddr::new(200 * 4096);
    let ptep = MachAddr::new((mfn << 12) | (200 * 8)).unwrap();
    let nr = u64::MAX - 100;
    assert_eq!(
        check_set_ptes(addr, ptep, nr),
        Err(SetPtesRule::CrossesTable {
            first_index: 200,
            nr
        })
    );
    for nr in [u64::MAX, u64::MAX - 311, 1 << 63, 313] {
        assert_eq!(
            check_set_ptes(addr, ptep, nr),
            Err(SetPtesRule::CrossesTable {
                first_index: 200,
                nr
            }),
            "nr {nr:#x}"
        );
    }
    assert_eq!(
        check_set_ptes(addr, ptep, 312),
        Ok(()),
        "up to the table's end"
    );

    let (mut l, s) = std_setup();
    let called = RefCell::new(0);
    let v = |i: u64| {
        *called.borrow_mut() += 1;
        s.pte_value(i as usize)
    };
    let (addr, ptep) = (s.va(200), s.pte_ptr(200));
    for paused in [false, true] {
        l.enter().unwrap();
        if paused {
            l.pause().unwrap();
        }
        assert_eq!(
            l.set_ptes(addr, ptep, u64::MAX - 100, v),
            Err(MmuError::SetPtes(SetPtesRule::CrossesTable {
                first_index: 200,
                nr: u64::MAX - 100
            }))
        );
        assert_eq!((l.queued_entries(), calls(&l)), (0, 0), "queued nothing");
        if paused {
            l.resume().unwrap();
        }
        l.leave().unwrap();
    }
    assert_eq!(*called.borrow(), 0, "no value was asked for");
    assert_eq!(live(&l, &s, 200), Pte::NONE);
}

#[test]
fn set_ptes_batches_its_writes_even_when_paused() {
    let (mut l, s) = std_setup();
    let v = |i: u64| s.pte_value(i as usize);
    l.set_ptes(s.va(100), s.pte_ptr(100), 20, v).unwrap();
    assert_eq!(calls(&l), 1, "outside lazy mode: one hypercall for all");
    assert!(mmu_call(20)(last_call(&l)));
    assert!(!l.is_active());
    assert_eq!(l.counters().flushes_for(FlushReason::Leave), 1);

    l.enter().unwrap();
    set(&mut l, &s, 0, 0).unwrap();
    l.set_ptes(s.va(200), s.pte_ptr(200), 5, v).unwrap();
    assert_eq!(calls(&l), 2, "inside: its (nested) leave flushes");
    assert!(mmu_call(6)(last_call(&l)));
    assert!(l.is_active());

    l.pause().unwrap();
    l.set_ptes(s.va(300), s.pte_ptr(300), 3, v).unwrap();
    assert_eq!(calls(&l), 3, "paused: one mmu_update at once");
    assert!(mmu_call(3)(last_call(&l)));
    assert!(l.is_paused() && l.queued_entries() == 0);
    l.resume().unwrap();
    l.leave().unwrap();
    for i in 0..20 {
        assert_eq!(live(&l, &s, 100 + i), s.pte_value(i));
    }
    assert_eq!(live(&l, &s, 204), s.pte_value(4));
    assert_eq!(live(&l, &s, 302), s.pte_value(2));
}

/// Regression: paused, the old `set_ptes()` issued one write at a time and stopped at the
/// first refusal (`?`), so entry 2 of [ok, refused, ok] was never written. Now a paused
/// `set_ptes()` is one `mmu_update` that carries on past refusals: the same tables and the
/// same refusal as unpaused.
#[test]
fn a_paused_set_ptes_carries_on_past_a_refusal_like_an_unpaused_one() {
    let mut outcomes = Vec::new();
    for paused in [false, true] {
        let (mut l, s) = std_setup();
        let table = pinned_l1(&mut l);
        let bad = writable(table);
        let v = |i: u64| if i == 1 { bad } else { s.pte_value(i as usize) };
        if paused {
            l.enter().unwrap();
            l.pause().unwrap();
        }
        let f = refused(l.set_ptes(s.va(40), s.pte_ptr(40), 3, v));
        assert_eq!(f.count, 1, "paused {paused}");
        assert_eq!(
            f.first.request,
            Some(set_pte_request(&s, 41, bad)),
            "paused {paused}"
        );
        assert_eq!(f.first.error, XenError::Busy);
        assert_eq!(
            f.flush,
            if paused {
                None
            } else {
                Some(FlushReason::Leave)
            }
        );
        assert_eq!(listed(&l), [f.first]);
        assert_eq!(live(&l, &s, 40), s.pte_value(0), "paused {paused}");
        assert_eq!(live(&l, &s, 41), Pte::NONE, "paused {paused}");
        assert_eq!(live(&l, &s, 42), s.pte_value(2), "paused {paused}");
        // Both: the three requests in one mmu_update, then the one after the refusal.
        let sizes: Vec<usize> = l
            .hypervisor()
            .log
            .iter()
            .map(|c| c.requests().len())
            .collect();
        assert_eq!(sizes, [3, 1], "paused {paused}");
        if paused {
            l.resume().unwrap();
            l.leave().unwrap();
        }
        l.hypervisor().check_refcounts();
        outcomes.push((l, f.first, f.count));
    }
    let (unpaused, paused) = (&outcomes[0], &outcomes[1]);
    assert!(unpaused.0.hypervisor().same_tables(paused.0.hypervisor()));
    assert_eq!((unpaused.1, unpaused.2), (paused.1, paused.2));
}

/// Entry `i` gets `pte_at(i)` and maps `addr + i * 4096`, for `i` in `0..nr` (each asked for
/// once): consecutive frames land in consecutive entries. A stride of 2 in the entry, the
/// value index or the address would show here.
#[test]
fn set_ptes_maps_consecutive_frames_to_consecutive_entries() {
    for mode in ["outside", "inside", "paused"] {
        let (mut l, s) = std_setup();
        let table = pinned_l1(&mut l);
        let bad = writable(table);
        let asked = RefCell::new(Vec::new());
        // Frame 10 + i at entry i, except entry 3: a refused value, so that the report shows
        // which entry and address request 3 went to.
        let v = |i: u64| {
            asked.borrow_mut().push(i);
            if i == 3 {
                bad
            } else {
                s.pte_value(10 + i as usize)
            }
        };
        if mode != "outside" {
            l.enter().unwrap();
        }
        if mode == "paused" {
            l.pause().unwrap();
        }
        let (first, nr) = (64, 6);
        let r = l.set_ptes(s.va(first), s.pte_ptr(first), nr as u64, v);
        if mode == "inside" {
            assert_eq!(r, Ok(()), "reported where the section ends");
            l.table_op(lazy_mmu::TableOp::TlbFlushLocal).unwrap();
            let f = refused(l.leave());
            check_refusal(&s, &l, f, first + 3, bad);
        } else {
            check_refusal(&s, &l, refused(r), first + 3, bad);
        }
        let mut asked = asked.into_inner();
        asked.sort_unstable();
        asked.dedup();
        assert_eq!(asked, [0, 1, 2, 3, 4, 5], "{mode}: every index once");
        for i in 0..nr {
            let want = if i == 3 {
                Pte::NONE
            } else {
                s.pte_value(10 + i)
            };
            assert_eq!(live(&l, &s, first + i), want, "{mode}: entry {i}");
        }
        for slot in (first - 2..first).chain(first + nr..first + 2 * nr) {
            assert_eq!(
                live(&l, &s, slot),
                Pte::NONE,
                "{mode}: slot {slot} untouched"
            );
        }
        // The requests went out in entry order.
        let ptrs: Vec<u64> = l.hypervisor().log[0]
            .requests()
            .iter()
            .map(|&(p, _)| p)
            .collect();
        let want: Vec<u64> = (0..nr).map(|i| s.pte_ptr(first + i).get()).collect();
        assert_eq!(ptrs, want, "{mode}");
        assert!(matches!(
            l.hypervisor().log[0],
            Call::MmuUpdate { done: 3, .. }
        ));
    }
}

fn check_refusal(s: &Space, l: &Lazy, f: lazy_mmu::Refusals, slot: usize, bad: Pte) {
    assert_eq!(f.count, 1);
    assert_eq!(f.first.request, Some(set_pte_request(s, slot, bad)));
    assert_eq!((f.first.entry, f.first.index), (0, 3));
    assert_eq!(listed(l), [f.first]);
}
