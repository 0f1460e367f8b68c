//! System time and the tick.
//!
//! System time (ns since Xen booted) is `system_time + scaled(tsc - tsc_timestamp)` from vCPU
//! 0's `vcpu_time_info`, read under its version counter (odd while Xen updates it).
//!
//! The tick: `VIRQ_TIMER` bound to a port, one-shot absolute deadlines with `set_timer_op`,
//! each next deadline = the previous one + the period (no drift), and the 100 Hz periodic
//! timer a PV vCPU starts with stopped so that it does not add ticks of its own. The handler
//! runs the tick hooks (in the upcall, events masked), then re-arms. [`ticks`] counts the
//! periods elapsed by the last timer interrupt, so a late interrupt (a stalled host) counts
//! every tick it covers without firing a burst; and the next deadline is at least half a
//! period after the handler ends, so the interrupted code always makes progress even where a
//! handler takes longer than a period (the PV shim under TCG).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use hypercalls::abi::VIRQ_TIMER;
use hypercalls::{XenError, calls};

use super::events::{self, IrqMutex};
use super::shared::shared_info_ptr;
use crate::arch::rdtsc;

/// Highest tick rate [`start`] accepts.
pub const MAX_HZ: u32 = 20_000;
/// Tick hooks at most.
pub const MAX_HOOKS: usize = 4;

/// System time in ns (0 before shared info is mapped).
pub fn now_ns() -> u64 {
    let Some(si) = shared_info_ptr() else {
        return 0;
    };
    // SAFETY: the shared-info page stays mapped; the time fields are plain integers Xen
    // rewrites under `version`, read here as values (volatile) and checked with it.
    let t = unsafe { &raw const (*si).vcpu_info[0].time };
    loop {
        // SAFETY: see above.
        let (v1, stamp, system, mul, shift, v2) = unsafe {
            let v1 = core::ptr::read_volatile(&raw const (*t).version);
            fence(Ordering::Acquire);
            let stamp = core::ptr::read_volatile(&raw const (*t).tsc_timestamp);
            let system = core::ptr::read_volatile(&raw const (*t).system_time);
            let mul = core::ptr::read_volatile(&raw const (*t).tsc_to_system_mul);
            let shift = core::ptr::read_volatile(&raw const (*t).tsc_shift);
            fence(Ordering::Acquire);
            let v2 = core::ptr::read_volatile(&raw const (*t).version);
            (v1, stamp, system, mul, shift, v2)
        };
        if v1 != v2 || v1 & 1 != 0 {
            continue;
        }
        let mut delta = rdtsc().wrapping_sub(stamp);
        if shift >= 0 {
            delta <<= shift;
        } else {
            delta >>= -shift;
        }
        return system.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
    }
}

/// A tick hook: runs in the upcall on every tick.
pub type TickHook = fn();

static PORT: AtomicU32 = AtomicU32::new(u32::MAX);
static PERIOD_NS: AtomicU64 = AtomicU64::new(0);
static DEADLINE: AtomicU64 = AtomicU64::new(0);
static START: AtomicU64 = AtomicU64::new(0);
static TICKS_BASE: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
static INTERRUPTS: AtomicU64 = AtomicU64::new(0);
static HOOKS: IrqMutex<[Option<TickHook>; MAX_HOOKS]> = IrqMutex::new([None; MAX_HOOKS]);

/// Ticks since boot (periods elapsed while ticking, as of the last timer interrupt).
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// System time (ns) of the last [`start`]: ticks count periods from it.
pub fn started_at() -> u64 {
    START.load(Ordering::Relaxed)
}

/// Timer interrupts handled since boot.
pub fn interrupts() -> u64 {
    INTERRUPTS.load(Ordering::Relaxed)
}

/// The tick rate, 0 when stopped.
pub fn hz() -> u32 {
    match PERIOD_NS.load(Ordering::Relaxed) {
        0 => 0,
        p => (1_000_000_000 / p) as u32,
    }
}

fn on_timer(_port: u32) {
    let period = PERIOD_NS.load(Ordering::Relaxed);
    if period == 0 {
        return;
    }
    INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    let elapsed = now_ns().saturating_sub(START.load(Ordering::Relaxed)) / period;
    TICKS.fetch_max(
        TICKS_BASE.load(Ordering::Relaxed) + elapsed,
        Ordering::Relaxed,
    );
    let hooks = *HOOKS.lock();
    for h in hooks.into_iter().flatten() {
        h();
    }
    let earliest = now_ns() + period / 2;
    let mut next = DEADLINE.load(Ordering::Relaxed) + period;
    if next < earliest {
        next += ((earliest - next) / period + 1) * period;
    }
    DEADLINE.store(next, Ordering::Relaxed);
    let _ = calls::set_timer_op(next);
}

/// Start ticking at `hz` (1 to [`MAX_HZ`]); the first tick comes one period from now.
pub fn start(hz: u32) -> Result<(), XenError> {
    if !(1..=MAX_HZ).contains(&hz) {
        return Err(XenError::Inval);
    }
    let _irq = events::IrqGuard::new();
    if PORT.load(Ordering::Relaxed) == u32::MAX {
        calls::stop_periodic_timer(0)?;
        let port = events::bind_virq(VIRQ_TIMER, on_timer)?;
        PORT.store(port, Ordering::Relaxed);
    }
    let period = 1_000_000_000 / hz as u64;
    let now = now_ns();
    TICKS_BASE.store(ticks(), Ordering::Relaxed);
    START.store(now, Ordering::Relaxed);
    PERIOD_NS.store(period, Ordering::Relaxed);
    let first = now + period;
    DEADLINE.store(first, Ordering::Relaxed);
    calls::set_timer_op(first)
}

/// Stop ticking (the port stays bound for the next [`start`]).
pub fn stop() {
    let _irq = events::IrqGuard::new();
    PERIOD_NS.store(0, Ordering::Relaxed);
    let _ = calls::set_timer_op(0);
}

/// Run `hook` on every tick until [`remove_hook`].
pub fn add_hook(hook: TickHook) -> Result<(), XenError> {
    let mut hooks = HOOKS.lock();
    let slot = hooks
        .iter_mut()
        .find(|h| h.is_none())
        .ok_or(XenError::Range)?;
    *slot = Some(hook);
    Ok(())
}

pub fn remove_hook(hook: TickHook) {
    for h in HOOKS.lock().iter_mut() {
        if h.is_some_and(|f| core::ptr::fn_addr_eq(f, hook)) {
            *h = None;
        }
    }
}
