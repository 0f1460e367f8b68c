//! What batching buys: map then unmap N pages with each strategy ([`strategies`]), against the
//! interface's lower bound, counting hypercalls and `rdtsc` cycles (median of `reps` timed
//! repetitions after one checked, untimed run). Then what two rules of the batch cost or save
//! where they apply: the type-change rule (mapping into fresh L1 tables in one section) and
//! the coalescing of TLB operations (unmap N, then `invlpg` each).
//!
//! The region's page tables are built before timing, and the pages map a pool of 512 frames
//! over and over, so the main figures are PTE writes only. Output lines start with `BENCH-`
//! for `scripts/bench` to parse (`BENCH-ROW`, `BENCH-FOOTPRINT`, `BENCH-REPS`; the others are
//! for reading).
#![forbid(unsafe_code)]

mod strategies;
mod switch;

use alloc::string::String;
use alloc::vec::Vec;

use hypercalls::calls::issued;
use lazy_mmu::{
    Counters, DEFAULT_ENTRIES, DEFAULT_REQUESTS, FlushReason, LINUX_ENTRIES, LINUX_REQUESTS,
};
use strategies::{Bench, POOL, STRATEGIES, Strategy, in_section, map_of};

use crate::arch::rdtsc;
use crate::framework::cmdline::Options;
use crate::framework::runner::Verdict;
use crate::mm::MmError;
use crate::mm::batches::footprint;
use crate::mm::region::{Map, Region};

const SIZES: [u64; 6] = [1, 8, 32, 512, 4096, 65536];
const TYPE_CHANGE_SIZES: [u64; 3] = [512, 4096, 65536];
const TLB_SIZES: [u64; 3] = [8, 32, 512];

/// Word 0 of pool frame `k`.
fn marker(k: u64) -> u64 {
    0xbe9c_0000 + k
}

/// Map, check pages read their frame's marker, unmap, check the pages fault.
fn checked_run(b: &mut Bench<'_>, s: Strategy, n: u64) -> Result<(), String> {
    b.run(s, n, false).map_err(|e| alloc::format!("map: {e}"))?;
    for i in [0, n / 2, n - 1] {
        let want = marker(i % POOL);
        match b.region.probe(i, 0) {
            Ok(v) if v == want => {}
            other => {
                return Err(alloc::format!(
                    "page {i}: read {other:?}, expected {want:#x}"
                ));
            }
        }
    }
    b.run(s, n, true)
        .map_err(|e| alloc::format!("unmap: {e}"))?;
    for i in [0, n - 1] {
        if b.region.probe(i, 0).is_ok() {
            return Err(alloc::format!("page {i} still mapped after unmap"));
        }
    }
    Ok(())
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Flushes by reason, e.g. "full:63,leave:2"; "-" when there were none.
fn flushes(d: &Counters) -> String {
    let mut out = String::new();
    for r in FlushReason::ALL {
        let k = d.flushes_for(r);
        if k > 0 {
            let sep = if out.is_empty() { "" } else { "," };
            out += &alloc::format!("{sep}{}:{k}", r.name());
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

/// One timed measurement: `f`'s cycles, raw hypercalls and the per-vCPU counters' change.
fn measure(f: impl FnOnce() -> Result<(), MmError>) -> Result<(u64, u64, Counters), MmError> {
    let (raw0, c0) = (issued(), crate::mm::pte::counters());
    let t0 = rdtsc();
    f()?;
    let t1 = rdtsc();
    Ok((
        t1 - t0,
        issued() - raw0,
        crate::mm::pte::counters().since(&c0),
    ))
}

fn strategy_rows(options: &Options, region: &Region) -> Result<(), String> {
    let mut b = Bench::new(region).map_err(|e| alloc::format!("setup: {e}"))?;
    for n in SIZES {
        for s in STRATEGIES {
            checked_run(&mut b, s, n).map_err(|e| alloc::format!("{} n={n}: {e}", s.name()))?;
        }
        // Repetitions go round the strategies, so that a slow phase of the (shared, emulated)
        // host falls on all of them alike rather than on whichever ran then.
        let mut cycles: Vec<Vec<u64>> = STRATEGIES.iter().map(|_| Vec::new()).collect();
        let mut last = [(0, Counters::default()); STRATEGIES.len()];
        for _ in 0..options.reps {
            for (i, s) in STRATEGIES.into_iter().enumerate() {
                let (raw0, c0) = (issued(), b.counters(s));
                let t0 = rdtsc();
                let mapped = b.run(s, n, false);
                let unmapped = b.run(s, n, true);
                let t1 = rdtsc();
                mapped
                    .and(unmapped)
                    .map_err(|e| alloc::format!("{} n={n}: {e}", s.name()))?;
                cycles[i].push(t1 - t0);
                last[i] = (issued() - raw0, b.counters(s).since(&c0));
            }
        }
        for (i, s) in STRATEGIES.into_iter().enumerate() {
            let (hypercalls, d) = last[i];
            println!(
                "BENCH-ROW strategy={} n={n} hypercalls={hypercalls} multicalls={} entries={} requests={} flushes={} cycles={} pte_writes={}",
                s.name(),
                d.multicalls,
                d.multicall_entries,
                d.requests,
                flushes(&d),
                median(&mut cycles[i]),
                2 * n
            );
        }
    }
    Ok(())
}

/// The type-change rule where it applies: N pages mapped in one section into fresh L1 tables
/// (each new table: remap read-only, pin, hook). A pin or hook behind an entry of several
/// writes (the previous table's) flushes first; `type_change_flushes` counts those hypercalls:
/// what the rule costs over the batch's other flushes.
fn type_change_rows(options: &Options) -> Result<(), String> {
    for n in TYPE_CHANGE_SIZES {
        let mut cycles = Vec::new();
        let mut last = (0, Counters::default());
        for _ in 0..options.reps {
            let mut region = None;
            let (c, raw, d) = measure(|| {
                region = Some(Region::new_mapped_lazily(n, 1)?);
                Ok(())
            })
            .map_err(|e| alloc::format!("type-change n={n}: {e}"))?;
            let r = region.ok_or("type-change: no region")?;
            if r.probe(n - 1, 0).is_err() {
                return Err(alloc::format!("type-change n={n}: last page not mapped"));
            }
            drop(r);
            cycles.push(c);
            last = (raw, d);
        }
        let (raw, d) = last;
        let tc = d.flushes_for(FlushReason::TypeChange);
        println!(
            "BENCH-TYPECHANGE n={n} tables={} hypercalls={raw} batch_hypercalls={} entries={} type_change_flushes={tc} flushes={} cycles={}",
            n.div_ceil(512),
            d.hypercalls,
            d.multicall_entries,
            flushes(&d),
            median(&mut cycles)
        );
    }
    Ok(())
}

/// TLB-op coalescing: unmap N pages, then `invlpg` each, in one section. Consecutive TLB
/// operations share a multicall entry (Linux: `xen_extend_mmuext_op`); without that there would
/// be one entry for the writes and one per `invlpg`.
fn tlb_rows(options: &Options, region: &Region) -> Result<(), String> {
    for n in TLB_SIZES {
        let mut cycles = Vec::new();
        let mut last = (0, Counters::default());
        for _ in 0..options.reps {
            in_section(|| region.set_each(0, n, map_of))
                .map_err(|e| alloc::format!("tlb n={n}: map: {e}"))?;
            let (c, raw, d) = measure(|| {
                in_section(|| {
                    region.set_each(0, n, |_| Map::None)?;
                    (0..n).try_for_each(|i| region.invlpg(i))
                })
            })
            .map_err(|e| alloc::format!("tlb n={n}: unmap: {e}"))?;
            if region.probe(n - 1, 0).is_ok() {
                return Err(alloc::format!("tlb n={n}: page still mapped"));
            }
            cycles.push(c);
            last = (raw, d);
        }
        let (raw, d) = last;
        println!(
            "BENCH-TLB n={n} hypercalls={raw} entries={} uncoalesced_entries={} other_ops={} flushes={} cycles={}",
            d.multicall_entries.max(d.hypercalls),
            n + 1,
            d.other_ops,
            flushes(&d),
            median(&mut cycles)
        );
    }
    Ok(())
}

/// Run the benchmark (guest option `bench`, `reps=N`).
pub fn run(options: &Options) -> Verdict {
    let max_n = SIZES[SIZES.len() - 1];
    let region = match Region::new(max_n, POOL, 0) {
        Ok(r) => r,
        Err(e) => {
            println!("error: benchmark setup: {e}");
            return Verdict::Error;
        }
    };
    for k in 0..POOL {
        if let Err(e) = region.write(k, 0, marker(k)) {
            println!("error: benchmark setup: {e}");
            return Verdict::Error;
        }
    }
    println!(
        "BENCH-FOOTPRINT config=lazy entries={DEFAULT_ENTRIES} requests={DEFAULT_REQUESTS} bytes={}",
        footprint::<DEFAULT_ENTRIES, DEFAULT_REQUESTS>()
    );
    println!(
        "BENCH-FOOTPRINT config=linux_like entries={LINUX_ENTRIES} requests={LINUX_REQUESTS} bytes={}",
        footprint::<LINUX_ENTRIES, LINUX_REQUESTS>()
    );
    println!("BENCH-REPS {}", options.reps);
    let result = strategy_rows(options, &region)
        .and_then(|()| type_change_rows(options))
        .and_then(|()| tlb_rows(options, &region))
        .and_then(|()| switch::rows(options));
    match result {
        Ok(()) => Verdict::Success,
        Err(e) => {
            println!("error: {e}");
            Verdict::Failure
        }
    }
}
