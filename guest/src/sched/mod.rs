//! Kernel tasks and a round-robin scheduler on vCPU 0, with preemption from the timer upcall.
//!
//! The boot context is task 0, `main`. [`spawn`] makes a task with its own stack that runs a
//! closure; [`yield_now`] switches cooperatively; when the closure returns the task exits; a
//! task that panics is reported with its name ([`current_name`]) and ends the domain, as a
//! kernel `BUG` does. While [`set_preemption`] is on, every tick asks for a switch, made on the
//! way out of the upcall: the upcall's frame is the task's saved context.
//!
//! The context-switch rule for lazy MMU state (Linux's `xen_start_context_switch` /
//! `xen_end_context_switch`): the outgoing task is switched out of the per-vCPU batch
//! (`switch_out`: its queued writes are flushed, their refusals stay with its state, reported
//! by its own outermost leave, flush or pause), the incoming one is switched in (batching
//! resumes at its depth). No queued write crosses a switch. Under `lazy=was-lazy-flag` a task
//! switched out at depth 2 or more is Linux 2023-2025's `BUG` in `enter_lazy(XEN_LAZY_CPU)`: a
//! panic, reported with the task's name.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use lazy_mmu::TaskLazy;

use crate::arch::context::{self, ContextHooks, Saved, Why};
use crate::arch::traps::TrapFrame;
use crate::mm::pte;
use crate::xen::events::{self, IrqMutex};
use crate::xen::time;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Runnable,
    /// Its closure returned: never runs again.
    Dead,
}

struct Task {
    name: &'static str,
    state: State,
    /// Its lazy-MMU state while it is not running.
    lazy: TaskLazy,
    /// Its registers while it is not running.
    saved: Option<Saved>,
}

/// Switches and what the outgoing task's lazy state was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub switches: u64,
    /// Made on the way out of an upcall (not asked for by the task).
    pub preemptions: u64,
    /// The outgoing task was in a lazy section (enable count > 0, paused or not).
    pub in_lazy: u64,
    /// ... at depth 1, at depth 2 or more, and paused.
    pub at_depth1: u64,
    pub at_depth2: u64,
    pub paused: u64,
    /// Upcalls that interrupted a task inside a lazy section.
    pub upcalls_in_lazy: u64,
}

struct Sched {
    tasks: Vec<Task>,
    current: usize,
    stats: Stats,
}

static SCHED: IrqMutex<Sched> = IrqMutex::new(Sched {
    tasks: Vec::new(),
    current: 0,
    stats: Stats {
        switches: 0,
        preemptions: 0,
        in_lazy: 0,
        at_depth1: 0,
        at_depth2: 0,
        paused: 0,
        upcalls_in_lazy: 0,
    },
});
static PREEMPT: AtomicBool = AtomicBool::new(false);
static NEED_RESCHED: AtomicBool = AtomicBool::new(false);

static HOOKS: ContextHooks = ContextHooks {
    events: upcall_events,
    schedule,
    exit: exit_current,
    failsafe,
};

/// The failsafe report needs the fatal-trap handler of the layers above.
static FAILSAFE: spin::Once<fn(&TrapFrame) -> !> = spin::Once::new();

/// Register the upcall, make the boot context task 0 (`main`) and mask every port.
pub fn init(failsafe: fn(&TrapFrame) -> !) -> Result<(), hypercalls::XenError> {
    FAILSAFE.call_once(|| failsafe);
    events::init();
    SCHED.lock().tasks.push(Task {
        name: "main",
        state: State::Runnable,
        lazy: TaskLazy::NEW,
        saved: None,
    });
    context::install(&HOOKS)?;
    time::add_hook(on_tick).map_err(|_| hypercalls::XenError::Range)
}

fn failsafe(frame: &TrapFrame) -> ! {
    match FAILSAFE.get() {
        Some(f) => f(frame),
        None => panic!("failsafe callback at rip {:#x}", frame.rip),
    }
}

/// The upcall: interrupt context for the lazy-MMU layer while the handlers run.
fn upcall_events() {
    let state = pte::lazy_state();
    if state.enable > 0 {
        SCHED.lock().stats.upcalls_in_lazy += 1;
    }
    pte::irq_enter();
    events::dispatch();
    if let Err(e) = pte::irq_exit() {
        panic!("{e}");
    }
}

fn on_tick() {
    if PREEMPT.load(Ordering::Relaxed) {
        NEED_RESCHED.store(true, Ordering::Relaxed);
    }
}

/// Preempt tasks on every tick (or not).
pub fn set_preemption(on: bool) {
    PREEMPT.store(on, Ordering::Relaxed);
    if !on {
        NEED_RESCHED.store(false, Ordering::Relaxed);
    }
}

/// The next runnable task after `current`, round robin (`main` included: it may still be
/// spawning tasks when a tick preempts it).
fn pick_next(s: &Sched) -> usize {
    let n = s.tasks.len();
    (1..=n)
        .map(|k| (s.current + k) % n)
        .find(|&i| s.tasks[i].state == State::Runnable)
        .unwrap_or(0)
}

fn schedule(cur: Saved, why: Why) -> Saved {
    let mut s = SCHED.lock();
    if why == Why::Upcall && !NEED_RESCHED.swap(false, Ordering::Relaxed) {
        return cur;
    }
    let from = s.current;
    let next = pick_next(&s);
    if next == from && s.tasks[from].state == State::Runnable {
        return cur;
    }
    let lazy = match pte::switch_out() {
        Ok(l) => l,
        Err(e) => {
            drop(s);
            panic!("{e}");
        }
    };
    let st = lazy.state();
    if st.enable > 0 {
        s.stats.in_lazy += 1;
        if st.pause > 0 {
            s.stats.paused += 1;
        } else if st.enable == 1 {
            s.stats.at_depth1 += 1;
        } else {
            s.stats.at_depth2 += 1;
        }
    }
    s.stats.switches += 1;
    if why == Why::Upcall {
        s.stats.preemptions += 1;
    }
    let outgoing = &mut s.tasks[from];
    outgoing.lazy = lazy;
    if outgoing.state == State::Runnable {
        outgoing.saved = Some(cur);
    } else {
        // A dead task's context is dropped; its stack is freed at the next switch.
        drop(cur);
    }
    let incoming = &mut s.tasks[next];
    let lazy = incoming.lazy;
    let resume = incoming
        .saved
        .take()
        .expect("a runnable task that is not running has a saved context");
    s.current = next;
    if let Err(e) = pte::switch_in(lazy) {
        drop(s);
        panic!("{e}");
    }
    resume
}

fn exit_current() -> ! {
    let state = pte::lazy_state();
    if state.enable > 0 || state.pause > 0 {
        panic!(
            "task exited inside a lazy MMU section (enable {}, pause {})",
            state.enable, state.pause
        );
    }
    events::mask();
    {
        let mut s = SCHED.lock();
        let cur = s.current;
        s.tasks[cur].state = State::Dead;
    }
    context::switch(true);
    unreachable!("a dead task was resumed");
}

/// Start a task named `name` running `f` (it runs when the scheduler picks it).
pub fn spawn(name: &'static str, f: impl FnOnce() + Send + 'static) {
    let saved = Saved::new_task(Box::new(f));
    SCHED.lock().tasks.push(Task {
        name,
        state: State::Runnable,
        lazy: TaskLazy::NEW,
        saved: Some(saved),
    });
}

/// Let the next task run; this one continues when its turn comes again. Events keep their
/// state across the switch.
pub fn yield_now() {
    let was_masked = events::mask();
    context::switch(!was_masked);
}

/// Tasks other than `main` that have not exited.
pub fn alive() -> usize {
    SCHED
        .lock()
        .tasks
        .iter()
        .skip(1)
        .filter(|t| t.state == State::Runnable)
        .count()
}

/// From `main`: run `body` with the timer ticking at `hz` and preempting tasks on every tick
/// (events unmasked), then stop both; `body`'s value.
pub fn with_preemption<T>(hz: u32, body: impl FnOnce() -> T) -> Result<T, hypercalls::XenError> {
    time::start(hz)?;
    set_preemption(true);
    events::unmask();
    let out = body();
    events::mask();
    set_preemption(false);
    time::stop();
    Ok(out)
}

/// From `main`: run the spawned tasks until every one has exited, then forget them.
pub fn join_all() {
    while alive() > 0 {
        yield_now();
    }
    SCHED.lock().tasks.truncate(1);
}

/// The running task's name (`None` while the scheduler's lock is taken, e.g. in a panic in
/// the middle of a switch).
pub fn current_name() -> Option<&'static str> {
    let s = SCHED.try_lock()?;
    s.tasks.get(s.current).map(|t| t.name)
}

/// Switch counters since boot.
pub fn stats() -> Stats {
    SCHED.lock().stats
}

type Job = Box<dyn FnOnce() + Send>;

/// The IPI port [`run_in_interrupt`] raises, and the job its handler runs.
static IPI: IrqMutex<(Option<u32>, Option<Job>)> = IrqMutex::new((None, None));

fn ipi_handler(_port: u32) {
    let job = IPI.lock().1.take();
    if let Some(job) = job {
        job();
    }
}

/// Run `f` in interrupt context, now: an IPI to this vCPU whose handler runs `f` in the upcall
/// (between `irq_enter` and `irq_exit`) before this returns. Events are unmasked for the IPI
/// and restored after. The caller's lazy section, if any, is the interrupted one.
pub fn run_in_interrupt(f: impl FnOnce() + Send + 'static) -> Result<(), hypercalls::XenError> {
    let port = {
        let mut ipi = IPI.lock();
        let port = match ipi.0 {
            Some(p) => p,
            None => {
                let p = events::bind_ipi(ipi_handler)?;
                ipi.0 = Some(p);
                p
            }
        };
        ipi.1 = Some(Box::new(f));
        port
    };
    let was_masked = events::mask();
    events::unmask();
    let sent = events::notify(port);
    if was_masked {
        events::mask();
    }
    sent?;
    if IPI.lock().1.is_some() {
        return Err(hypercalls::XenError::Again);
    }
    Ok(())
}
