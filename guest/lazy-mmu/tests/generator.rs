//! The program generator, its random number generator, and the runner's own checks.

mod common;

use common::*;
use hypercalls::abi::pt_update;
use hypercalls::{MachAddr, Pte};
use lazy_mmu::model::{Model, Space};
use lazy_mmu::program::{self, GenOptions, Layout, Observer, Op, Rng, Shadow};
use lazy_mmu::{FlushReason, Hypervisor};
use x86_64::VirtAddr;

const PLAIN: GenOptions = GenOptions {
    refusals: false,
    tlb_ops: false,
};

#[test]
fn generated_programs_are_balanced_and_in_range() {
    for (seed, opts) in (0..300).flat_map(|s| [(s, PLAIN), (s, GenOptions::ALL)]) {
        let depth = (seed % 9) as u32;
        let slots = 1 + (seed as usize * 37) % 1500;
        let frames = 1 + (seed as usize * 11) % 700;
        let ops = (seed as usize * 7) % 500;
        let prog = program::generate_with(seed, ops, depth, slots, frames, opts);
        assert_eq!(prog.len(), ops, "seed {seed}");
        assert_eq!(
            prog,
            program::generate_with(seed, ops, depth, slots, frames, opts)
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
    let prog = program::generate(7, 5000, 8, 1024, 600);
    let has = |f: fn(&Op) -> bool| prog.iter().any(f);
    assert!(has(|o| matches!(o, Op::Enter)) && has(|o| matches!(o, Op::Pause)));
    assert!(has(|o| matches!(o, Op::SetPte { .. })) && has(|o| matches!(o, Op::Clear { .. })));
    assert!(has(|o| matches!(o, Op::SetPtes { nr, .. } if *nr > 64)));
    assert!(has(|o| matches!(o, Op::Flush)) && has(|o| matches!(o, Op::Read { .. })));
    assert!(
        program::generate(7, 100, 0, 10, 10)
            .iter()
            .all(|o| !matches!(o, Op::Enter | Op::Pause))
    );
    // Degenerate layouts still give balanced programs.
    assert_eq!(program::generate(1, 50, 3, 0, 0).len(), 50);
    assert_eq!(
        program::generate_with(1, 50, 3, 0, 0, GenOptions::ALL).len(),
        50
    );

    // The extra ops only when asked for, each on its own.
    let bad = |o: &Op| matches!(o, Op::Bad { .. });
    let tlb = |o: &Op| matches!(o, Op::FlushTlb | Op::Invlpg { .. });
    assert!(!prog.iter().any(|o| bad(o) || tlb(o)));
    let with = |opts| program::generate_with(7, 5000, 8, 1024, 600, opts);
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
fn every_long_enough_program_batches_a_refused_write() {
    assert_eq!(program::check(program::MIN_OPS, 1), Ok(()));
    assert_eq!(
        program::check(program::MIN_OPS - 1, 1),
        Err(program::GenError::TooFewOps {
            ops: program::MIN_OPS - 1
        })
    );
    assert_eq!(program::check(500, 0), Err(program::GenError::NoSections));
    for seed in 0..50 {
        let prog = program::generate_with(seed, program::MIN_OPS, 1, 64, 64, GenOptions::ALL);
        assert_eq!(prog[0], Op::Enter, "seed {seed}");
        let end = prog.iter().position(|o| *o == Op::Leave).unwrap();
        assert_eq!(
            prog[..end]
                .iter()
                .filter(|o| matches!(o, Op::Bad { .. }))
                .count(),
            1,
            "seed {seed}"
        );
    }
}

#[test]
fn rng_is_deterministic_and_in_range() {
    let mut a = Rng::new(42);
    let mut b = Rng::new(42);
    let mut c = Rng::new(43);
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
    assert_eq!(Rng::new(0).below(1), 0);
}

/// Changes slot 3 behind the runner's back after op `at`.
struct Tamper<'a> {
    space: &'a Space,
    at: usize,
}

impl<const E: usize, const R: usize> Observer<Model, E, R> for Tamper<'_> {
    fn after_op(&mut self, i: usize, _: &Op, l: &mut Lazy<E, R>, _: &Shadow) -> Result<(), String> {
        if i == self.at {
            let req = pt_update(self.space.pte_ptr(3), Pte::NONE);
            l.hypervisor_mut().mmu_update(&[req]).unwrap();
        }
        Ok(())
    }
}

#[test]
fn run_reports_a_stale_read_and_compare_names_the_slot() {
    let (mut l, s) = std_setup();
    let prog = [Op::SetPte { slot: 3, frame: 1 }, Op::Read { slot: 3 }];
    let err = program::run_with(&mut l, &s, &prog, &mut Tamper { space: &s, at: 0 }).unwrap_err();
    assert!(
        err.starts_with("op 1 (Read { slot: 3 }): read 0x0"),
        "{err}"
    );
    // The shadow starts from the live tables, whatever they hold.
    let stats = program::run(&mut l, &s, &prog[1..], |_, _| Ok(())).unwrap();
    assert_eq!((stats.ops, stats.writes, stats.reads), (1, 0, 1));

    let prog = [Op::Enter, Op::SetPte { slot: 2, frame: 2 }, Op::Leave];
    let mut shadow_at_leave = None;
    program::run(&mut l, &s, &prog, |_, sh| {
        shadow_at_leave = Some(sh.clone());
        Ok(())
    })
    .unwrap();
    let shadow = shadow_at_leave.unwrap();
    assert_eq!(shadow.len(), 3);
    assert_eq!(shadow.get(2), s.pte_value(2));
    assert_eq!(program::compare(&l, &s, &shadow, 100), Ok(()));
    set(&mut l, &s, 2, 5).unwrap();
    let msg = program::compare(&l, &s, &shadow, 100).unwrap_err();
    assert!(msg.starts_with("slot 2 "), "{msg}");
    assert!(msg.contains(&format!("{}", s.pte_ptr(2))), "{msg}");
    // A failing hook stops the run and names the op.
    let err = program::run(&mut l, &s, &prog, |_, _| Err("boom".into())).unwrap_err();
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
    let stats = program::run(&mut l, &s, &prog, |l, sh| {
        leaves += 1;
        program::compare(l, &s, sh, 64)
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
    let stats = program::run(&mut l, &s, &prog, |l, sh| program::compare(l, &s, sh, 64)).unwrap();
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
    assert_eq!(
        live(&l, &s, 1),
        s.pte_value(1),
        "the refused write changed nothing"
    );
    for slot in [0, 3, 4, 5, 6, 40, 49] {
        assert_eq!(live(&l, &s, slot), Pte::NONE, "slot {slot}");
    }
}

/// A layout whose "bad" value Xen accepts.
struct Lenient<'a>(&'a Space);

impl Layout for Lenient<'_> {
    fn pte_ptr(&self, slot: usize) -> MachAddr {
        self.0.pte_ptr(slot)
    }
    fn va(&self, slot: usize) -> VirtAddr {
        self.0.va(slot)
    }
    fn pte_value(&self, frame: usize) -> Pte {
        self.0.pte_value(frame)
    }
    fn bad_value(&self) -> Pte {
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
    let err = program::run(&mut l, &Lenient(&s), &prog, |_, _| Ok(())).unwrap_err();
    assert!(
        err.starts_with("op 2 (Leave): 0 refusal(s) reported, 1 refused write(s)"),
        "{err}"
    );
    let err = program::run(&mut l, &Lenient(&s), &prog[1..2], |_, _| Ok(())).unwrap_err();
    assert!(err.contains("0 refusal(s) reported, 1 refused"), "{err}");

    let (mut l, s) = std_setup();
    let prog = [Op::Enter, Op::SetPte { slot: 0, frame: 0 }, Op::Leave];
    let err = program::run_with(&mut l, &s, &prog, &mut Sneak { space: &s, at: 1 }).unwrap_err();
    assert!(
        err.starts_with("op 2 (Leave): 1 refusal(s) reported, 0 refused write(s)"),
        "{err}"
    );
}

/// Every accepted size and depth gives a meaningful program: it batches at least a third of its writes,
/// fills the smallest batch (4 entries / 16 requests) and has refusals reported. Deep programs
/// once spent most of their length inside one early pause.
#[test]
fn programs_batch_at_every_depth() {
    for depth in [1, 2, 8, 16, 32, 64, 200] {
        for seed in 0..40 {
            let (mut l, s) = setup::<4, 16>(2, 64);
            let ops = program::MIN_OPS + (seed as usize * 37) % 2000;
            let prog = program::generate_with(seed, ops, depth, s.slots(), 64, GenOptions::ALL);
            let stats = program::run(&mut l, &s, &prog, |_, _| Ok(()))
                .unwrap_or_else(|e| panic!("depth {depth} seed {seed}: {e}"));
            let at = format!("depth {depth} seed {seed} ops {ops}");
            assert!(
                stats.flushes_for(FlushReason::Full) > 0,
                "{at}: never filled"
            );
            assert!(stats.reported_refusals > 0, "{at}: no refusal");
            assert!(
                stats.batched_writes * 3 > stats.writes,
                "{at}: {} of {} writes batched",
                stats.batched_writes,
                stats.writes
            );
        }
    }
}
