//! What batching buys: map then unmap N pages with each strategy, against the interface's lower
//! bound, counting hypercalls and `rdtsc` cycles (median of `reps` timed repetitions after one
//! checked, untimed run).
//!
//! Strategies (all end the unmap with one local TLB flush):
//! * `eager`: no lazy mode, one `mmu_update` per PTE;
//! * `lazy`: our per-vCPU batch (64 entries / 1024 requests), one section, `set_pte` per page;
//! * `set_ptes`: generic `set_ptes()` per L1 table inside an outer section (nested leaves flush);
//! * `lower_bound`: all requests prepared beforehand, one `mmu_update` to map, one multicall of
//!   `mmu_update` + TLB flush to unmap: the least this interface can do;
//! * `linux_like`: the same code as `lazy` with Linux's buffer (32 entries / 512 bytes of
//!   arguments, i.e. 32 requests).
//!
//! The VA range's page tables are built before timing, and the pages map a pool of 512 frames
//! over and over (mapping a frame many times is legal), so the figures are PTE writes only.
//! Output lines start with `BENCH-` for `scripts/bench` to parse.

use alloc::vec::Vec;
use core::arch::x86_64::_rdtsc;
use core::cell::Cell;

use hypercalls::abi::{DOMID_SELF, MMUEXT_TLB_FLUSH_LOCAL, MmuUpdate, mmuext_plain, pt_update};
use hypercalls::calls::{self, issued};
use hypercalls::multicall;

use crate::cmdline::Options;
use crate::mm::frames::{self, Frame};
use crate::mm::lazy::{
    Counters, DEFAULT_ENTRIES, DEFAULT_REQUESTS, FlushReason, LINUX_ENTRIES, LINUX_REQUESTS,
    LazyMmu, MmuError, Queue,
};
use crate::mm::pagetable;
use crate::mm::pte::{self, KERNEL_RW, Pte, PtePtr};
use crate::mm::xen_hv::XenHv;
use crate::testing::Verdict;
use crate::traps;
use crate::xen::PAGE_SIZE;

const SIZES: [u64; 6] = [1, 8, 32, 512, 4096, 65536];
const BENCH_VA: u64 = 0xFFFF_CB00_0000_0000;
const POOL: u64 = 512;
const TABLE: u64 = 512;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Eager,
    Lazy,
    SetPtes,
    LowerBound,
    LinuxLike,
}

const STRATEGIES: [Strategy; 5] = [
    Strategy::Eager,
    Strategy::Lazy,
    Strategy::SetPtes,
    Strategy::LowerBound,
    Strategy::LinuxLike,
];

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Eager => "eager",
            Strategy::Lazy => "lazy",
            Strategy::SetPtes => "set_ptes",
            Strategy::LowerBound => "lower_bound",
            Strategy::LinuxLike => "linux_like",
        }
    }
}

/// Everything prepared before timing.
struct Setup {
    pool: Vec<Frame>,
    /// First entry of each L1 table covering the range.
    tables: Vec<PtePtr>,
    map_reqs: Vec<MmuUpdate>,
    unmap_reqs: Vec<MmuUpdate>,
    /// The multicalls `lower_bound` made by hand (the lazy-MMU counters do not see them).
    lower_bound_counters: Cell<Counters>,
}

impl Setup {
    fn ptep(&self, i: u64) -> PtePtr {
        self.tables[(i / TABLE) as usize].offset(i % TABLE)
    }

    fn va(i: u64) -> u64 {
        BENCH_VA + i * PAGE_SIZE
    }

    fn pte(&self, i: u64) -> Pte {
        Pte::from_mfn(self.pool[(i % POOL) as usize].mfn, KERNEL_RW)
    }
}

fn prepare(max_n: u64) -> Result<Setup, crate::mm::MmError> {
    let pool = frames::alloc_run(POOL)?;
    for (i, f) in pool.iter().enumerate() {
        // SAFETY: fresh frames, ours alone, mapped read-write.
        unsafe { (f.va() as *mut u64).write_volatile(0xbe9c_0000 + i as u64) };
    }
    let mut tables = Vec::new();
    for t in 0..max_n.div_ceil(TABLE) {
        tables.push(pagetable::ensure_l1(BENCH_VA + t * TABLE * PAGE_SIZE)?);
    }
    let mut s = Setup {
        pool,
        tables,
        map_reqs: Vec::new(),
        unmap_reqs: Vec::new(),
        lower_bound_counters: Cell::new(Counters::default()),
    };
    s.map_reqs = (0..max_n)
        .map(|i| pt_update(s.ptep(i).0, s.pte(i).0))
        .collect();
    s.unmap_reqs = (0..max_n).map(|i| pt_update(s.ptep(i).0, 0)).collect();
    Ok(s)
}

type Outcome = Result<(), crate::mm::lazy::MmuError>;

/// One `set_pte` per page in one section, for map (`clear == false`) or unmap.
fn batch_pages<const E: usize, const R: usize>(
    l: &mut LazyMmu<XenHv, E, R>,
    s: &Setup,
    n: u64,
    clear: bool,
) -> Outcome {
    l.enter()?;
    for i in 0..n {
        let value = if clear { 0 } else { s.pte(i).0 };
        l.set_pte(s.ptep(i).0, value, Setup::va(i))?;
    }
    if clear {
        l.mmuext(mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL))?;
    }
    l.leave()
}

/// `set_ptes()` per L1 table inside one outer section.
fn batch_tables<const E: usize, const R: usize>(
    l: &mut LazyMmu<XenHv, E, R>,
    s: &Setup,
    n: u64,
    clear: bool,
) -> Outcome {
    l.enter()?;
    let first = if clear { Pte::NONE } else { s.pte(0) };
    let mut i = 0;
    while i < n {
        let nr = (n - i).min(TABLE);
        let next = |k| {
            first
                .next_pfn(k)
                .expect("the pool is the domain's frames")
                .0
        };
        l.set_ptes(Setup::va(i), s.ptep(i).0, nr, next)?;
        i += nr;
    }
    if clear {
        l.mmuext(mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL))?;
    }
    l.leave()
}

fn eager(s: &Setup, n: u64, clear: bool) -> Outcome {
    for i in 0..n {
        let value = if clear { Pte::NONE } else { s.pte(i) };
        pte::set_pte(s.ptep(i), value, Setup::va(i))?;
    }
    if clear {
        pte::flush_tlb_local()?;
    }
    Ok(())
}

/// The least this interface allows: requests prepared beforehand, one `mmu_update` for the map,
/// one multicall of `mmu_update` + TLB flush for the unmap. Counts what it issues in `s`.
fn lower_bound(s: &Setup, n: u64, clear: bool) -> Outcome {
    let refused = |e: hypercalls::XenError| MmuError::MulticallRejected(e);
    let mut c = s.lower_bound_counters.get();
    c.requests += n;
    s.lower_bound_counters.set(c);
    if !clear {
        // SAFETY: the requests map the benchmark's own range to its own frames.
        return unsafe { calls::mmu_update(&s.map_reqs[..n as usize], DOMID_SELF) }
            .map_err(|e| refused(e.error));
    }
    let flush = mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL);
    let mut done = [0u32; 2];
    let [d0, d1] = &mut done;
    let mut entries = [
        multicall::mmu_update_entry(s.unmap_reqs.as_ptr(), n as u32, d0, DOMID_SELF),
        multicall::mmuext_op_entry(&flush, 1, d1, DOMID_SELF),
    ];
    // SAFETY: the entries point at `unmap_reqs`, `flush` and `done`, all alive across the call,
    // and unmap only the benchmark's own range.
    unsafe { calls::multicall(&mut entries) }.map_err(refused)?;
    let mut c = s.lower_bound_counters.get();
    c.multicalls += 1;
    c.multicall_entries += entries.len() as u64;
    s.lower_bound_counters.set(c);
    match entries.iter().map(multicall::entry_result).find(|&r| r < 0) {
        Some(r) => Err(refused(hypercalls::XenError::from_errno(r))),
        None => Ok(()),
    }
}

struct Linux(LazyMmu<XenHv, LINUX_ENTRIES, LINUX_REQUESTS>);

fn run_once(strategy: Strategy, s: &Setup, linux: &mut Linux, n: u64, clear: bool) -> Outcome {
    match strategy {
        Strategy::Eager => eager(s, n, clear),
        Strategy::Lazy => pte::with_lazy(|l| batch_pages(l, s, n, clear)),
        Strategy::SetPtes => pte::with_lazy(|l| batch_tables(l, s, n, clear)),
        Strategy::LowerBound => lower_bound(s, n, clear),
        Strategy::LinuxLike => batch_pages(&mut linux.0, s, n, clear),
    }
}

fn counters(strategy: Strategy, s: &Setup, linux: &Linux) -> Counters {
    match strategy {
        Strategy::LinuxLike => linux.0.counters(),
        Strategy::LowerBound => s.lower_bound_counters.get(),
        _ => pte::counters(),
    }
}

/// Map, check every page reads its frame's marker, unmap, check the pages fault.
fn checked_run(
    strategy: Strategy,
    s: &Setup,
    linux: &mut Linux,
    n: u64,
) -> Result<(), alloc::string::String> {
    run_once(strategy, s, linux, n, false).map_err(|e| alloc::format!("map: {e}"))?;
    for i in [0, n / 2, n - 1] {
        let want = 0xbe9c_0000 + i % POOL;
        match traps::try_read_u64(Setup::va(i)) {
            Ok(v) if v == want => {}
            other => {
                return Err(alloc::format!(
                    "page {i}: read {other:?}, expected {want:#x}"
                ));
            }
        }
    }
    run_once(strategy, s, linux, n, true).map_err(|e| alloc::format!("unmap: {e}"))?;
    for i in [0, n - 1] {
        if traps::try_read_u64(Setup::va(i)).is_ok() {
            return Err(alloc::format!("page {i} still mapped after unmap"));
        }
    }
    Ok(())
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter; a PV kernel may execute it.
    unsafe { _rdtsc() }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Run the benchmark (guest option `bench`, `reps=N`).
pub fn run(options: &Options) -> Verdict {
    let max_n = *SIZES.last().unwrap_or(&1);
    let setup = match prepare(max_n) {
        Ok(s) => s,
        Err(e) => {
            println!("error: benchmark setup: {e}");
            return Verdict::Error;
        }
    };
    let mut linux = Linux(LazyMmu::new(XenHv));
    println!(
        "BENCH-FOOTPRINT config=lazy entries={DEFAULT_ENTRIES} requests={DEFAULT_REQUESTS} bytes={}",
        Queue::<DEFAULT_ENTRIES, DEFAULT_REQUESTS>::footprint()
    );
    println!(
        "BENCH-FOOTPRINT config=linux_like entries={LINUX_ENTRIES} requests={LINUX_REQUESTS} bytes={}",
        Queue::<LINUX_ENTRIES, LINUX_REQUESTS>::footprint()
    );
    println!("BENCH-REPS {}", options.reps);
    for n in SIZES {
        for strategy in STRATEGIES {
            if let Err(e) = checked_run(strategy, &setup, &mut linux, n) {
                println!("error: {} n={n}: {e}", strategy.name());
                return Verdict::Failure;
            }
            let mut cycles = Vec::new();
            let mut hypercalls = 0;
            let mut d = Counters::default();
            for _ in 0..options.reps {
                let (raw0, c0) = (issued(), counters(strategy, &setup, &linux));
                let t0 = rdtsc();
                let mapped = run_once(strategy, &setup, &mut linux, n, false);
                let unmapped = run_once(strategy, &setup, &mut linux, n, true);
                let t1 = rdtsc();
                if let Err(e) = mapped.and(unmapped) {
                    println!("error: {} n={n}: {e}", strategy.name());
                    return Verdict::Failure;
                }
                let c1 = counters(strategy, &setup, &linux);
                cycles.push(t1 - t0);
                hypercalls = issued() - raw0;
                d = c1.since(&c0);
            }
            let med = median(&mut cycles);
            // Flushes by reason, e.g. "full:63,leave:2"; "-" when the strategy has no batch.
            let mut flushes = alloc::string::String::new();
            for r in FlushReason::ALL {
                let k = d.flushes_for(r);
                if k > 0 {
                    let sep = if flushes.is_empty() { "" } else { "," };
                    flushes += &alloc::format!("{sep}{}:{k}", r.name());
                }
            }
            if flushes.is_empty() {
                flushes.push('-');
            }
            println!(
                "BENCH-ROW strategy={} n={n} hypercalls={hypercalls} multicalls={} entries={} requests={} flushes={flushes} cycles={med} pte_writes={}",
                strategy.name(),
                d.multicalls,
                d.multicall_entries,
                d.requests,
                2 * n
            );
        }
    }
    Verdict::Success
}
