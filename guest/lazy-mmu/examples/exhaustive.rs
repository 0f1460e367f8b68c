//! Every lazy-MMU program up to a length, checked against the strict in-order reference: on
//! tiny batches and the default one, and with two tasks and interrupts. Prints one summary line
//! (and one per configuration); exits 1 with the failing program.
//!
//! usage: cargo run --release -p lazy-mmu --example exhaustive [-- MAX_LEN]

use std::time::Instant;

use lazy_mmu::exhaustive::{
    ALPHABET, Failure, Stats, Sym, TASK_ALPHABET, check_all, check_all_over,
};
use lazy_mmu::{DEFAULT_ENTRIES, DEFAULT_REQUESTS};

type Check = fn(usize, &[Sym]) -> Result<Stats, Failure>;

/// Run `check` with the alphabet's first calls split across the machine's cores.
fn parallel(check: Check, alphabet: &[Sym], len: usize) -> Result<Stats, Failure> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(alphabet.len());
    let chunks: Vec<Vec<Sym>> = (0..threads)
        .map(|t| alphabet.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let results: Vec<Result<Stats, Failure>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|c| s.spawn(move || check(len, c)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("checker thread"))
            .collect()
    });
    let mut total = Stats::default();
    for r in results {
        let s = r?;
        total.programs += s.programs;
        total.executed += s.executed;
        total.reports += s.reports;
        total.refusals += s.refusals;
        total.replays += s.replays;
    }
    Ok(total)
}

fn main() {
    let len: usize = std::env::args()
        .nth(1)
        .map_or(7, |a| a.parse().expect("MAX_LEN is a number"));
    let start = Instant::now();
    let two_tasks: Check = |len, first| check_all_over::<2, 4>(&TASK_ALPHABET, len, first);
    let configs: [(&str, Check, &[Sym]); 4] = [
        ("1 entry/2 requests", check_all::<1, 2>, &ALPHABET),
        ("2 entries/4 requests", check_all::<2, 4>, &ALPHABET),
        (
            "default 64/1024",
            check_all::<DEFAULT_ENTRIES, DEFAULT_REQUESTS>,
            &ALPHABET,
        ),
        ("two tasks and interrupts, 2/4", two_tasks, &TASK_ALPHABET),
    ];
    let mut programs = 0;
    let mut details = Vec::new();
    for (name, check, alphabet) in configs {
        let t = Instant::now();
        match parallel(check, alphabet, len) {
            Ok(s) => {
                programs += s.programs;
                details.push(format!(
                    "{name}: {} programs, {} run, {} reports of {} refusals, {} replays, {:.1} s",
                    s.programs,
                    s.executed,
                    s.reports,
                    s.refusals,
                    s.replays,
                    t.elapsed().as_secs_f64()
                ));
            }
            Err(f) => {
                eprintln!("exhaustive: FAILED ({name}): {f}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "exhaustive: {programs} programs up to length {len} checked in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    for d in details {
        println!("  {d}");
    }
}
