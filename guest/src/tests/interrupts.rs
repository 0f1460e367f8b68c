//! The timer and interrupt handlers against lazy sections.
//!
//! In an upcall the kernel is never lazy (Linux: `xen_get_lazy_mode()` is NONE when
//! `in_interrupt()`): a handler's writes go out at once, its section calls do nothing, and it
//! leaves the interrupted section as it found it. A handler's read of an entry the interrupted
//! code has a queued write to flushes first. A handler's *write* to such an entry lands at once
//! and the queued write overwrites it when the interrupted section flushes: the order is
//! handler first, interrupted code second, as in Linux (where the page-table lock keeps
//! handlers off entries a section is changing: a handler must only write entries of its own).
//!
//! The handlers here run through an IPI to this vCPU (`sched::run_in_interrupt`), which Xen
//! delivers before `EVTCHNOP_send` returns, so each one interrupts an exact point.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use hypercalls::Pte;

use super::util::{check_mapped, check_unmapped, marked_region, marker};
use crate::framework::runner::{Context, TestFail, TestOutcome, failed};
use crate::mm::pte;
use crate::mm::region::{Map, Region};
use crate::sched;
use crate::xen::events::{self, IrqMutex};
use crate::xen::time;

/// What a handler saw, for the test to check afterwards.
type Log = Arc<IrqMutex<Vec<String>>>;

fn log() -> Log {
    Arc::new(IrqMutex::new(Vec::new()))
}

fn take(log: &Log) -> Vec<String> {
    core::mem::take(&mut *log.lock())
}

fn interrupt(f: impl FnOnce() + Send + 'static) -> TestOutcome {
    sched::run_in_interrupt(f).map_err(|e| failed(format!("self-IPI: {e}")))
}

/// The timer fires at the requested rate (`hz=`, default 1000) for a window of system time:
/// 50 ms, or 10 periods at slow rates, so that the count is never a handful of ticks.
pub fn timer(ctx: &Context) -> TestOutcome {
    let hz = ctx.options.hz;
    let window_ns = core::cmp::max(50_000_000, 10 * 1_000_000_000 / hz as u64);
    let ticks0 = time::ticks();
    let upcalls0 = events::upcalls();
    let irqs0 = time::interrupts();
    time::start(hz).map_err(|e| failed(format!("timer start: {e}")))?;
    // Ticks count from the start (under the shim, starting takes a few ms of hypercalls).
    let t0 = time::started_at();
    events::unmask();
    let mut last = t0;
    while last < t0 + window_ns {
        let now = time::now_ns();
        ensure!(now >= last, "system time went back: {last} -> {now}");
        last = now;
        core::hint::spin_loop();
    }
    // A stalled vCPU (a busy host) gets its ticks late, not never: the next interrupt counts
    // every period since the start. So the count is read after an interrupt that came once the
    // window had passed (or after one more window without any).
    let irqs_at_end = time::interrupts();
    while time::interrupts() == irqs_at_end && last < t0 + 2 * window_ns {
        last = time::now_ns();
        core::hint::spin_loop();
    }
    events::mask();
    time::stop();
    let ticks = time::ticks() - ticks0;
    let elapsed_ns = last - t0;
    let expected = hz as u64 * elapsed_ns / 1_000_000_000;
    let irqs = time::interrupts() - irqs0;
    println!(
        "    {ticks} ticks at {hz} Hz in {} ms of system time (expected {expected}); {irqs} timer interrupts, {} upcalls",
        elapsed_ns / 1_000_000,
        events::upcalls() - upcalls0
    );
    ensure!(irqs > 0, "no timer interrupt");
    ensure!(
        ticks * 2 >= expected && ticks <= expected + expected / 5 + 2,
        "{ticks} ticks, expected about {expected}"
    );
    Ok(())
}

/// An upcall in the middle of a section: the handler runs with lazy mode off and leaves the
/// queue as it found it; the section's writes land at its leave.
pub fn upcall_in_lazy(_ctx: &Context) -> TestOutcome {
    let r = marked_region(16, 4)?;
    let before = sched::stats().upcalls_in_lazy;
    let section = pte::LazySection::enter().map_err(failed)?;
    r.set_each(0, 8, |p| Map::Frame(p % 4)).map_err(failed)?;
    let queued = pte::queued();
    let seen = log();
    let l = seen.clone();
    interrupt(move || {
        let s = pte::lazy_state();
        l.lock().push(format!(
            "in_interrupt {} active {} enable {} pause {} queued {:?}",
            pte::in_interrupt(),
            pte::is_active(),
            s.enable,
            s.pause,
            pte::queued()
        ));
    })?;
    let seen = take(&seen);
    ensure_eq!(
        seen,
        alloc::vec![format!(
            "in_interrupt true active false enable 1 pause 0 queued {queued:?}"
        )],
        "what the handler saw"
    );
    ensure_eq!(pte::queued(), queued, "queue after the upcall");
    ensure!(pte::is_active(), "lazy mode not active after the upcall");
    ensure!(
        !r.live_pte(0).map_err(failed)?.is_present(),
        "a queued write landed during the upcall"
    );
    section.leave().map_err(failed)?;
    for p in 0..8 {
        check_mapped(&r, p, p % 4)?;
    }
    ensure!(
        sched::stats().upcalls_in_lazy > before,
        "the upcall was not counted as one during a lazy section"
    );
    Ok(())
}

/// A handler maps its own scratch page, reads it through the mapping at once and unmaps it,
/// while the interrupted task has writes queued to the neighbouring entries of the same L1
/// table. Under `irq=batch` the handler's map joins the interrupted batch and its read is a
/// #PF (crashes: run by name).
pub fn irq_scratch_page(_ctx: &Context) -> TestOutcome {
    const SCRATCH: u64 = 8;
    let r = Arc::new(marked_region(16, 8)?);
    let section = pte::LazySection::enter().map_err(failed)?;
    r.set_each(0, SCRATCH, |p| Map::Frame(p % 4))
        .map_err(failed)?;
    r.set_pte(SCRATCH + 1, Map::Frame(5)).map_err(failed)?;
    let queued = pte::queued();
    let seen = log();
    let (l, h) = (seen.clone(), r.clone());
    interrupt(move || {
        let out = |s: String| l.lock().push(s);
        if let Err(e) = h.set_pte(SCRATCH, Map::Frame(7)) {
            return out(format!("map: {e}"));
        }
        match h.read_mapped(SCRATCH, 0) {
            Ok(v) if v == marker(7, 0) => {}
            other => out(format!("read through the fresh mapping: {other:?}")),
        }
        if let Err(e) = h
            .set_pte(SCRATCH, Map::None)
            .and_then(|()| h.invlpg(SCRATCH))
        {
            out(format!("unmap: {e}"));
        }
        if h.probe(SCRATCH, 0).is_ok() {
            out(String::from("scratch page still mapped after the unmap"));
        }
    })?;
    let seen = take(&seen);
    ensure!(seen.is_empty(), "handler: {}", seen.join("; "));
    ensure_eq!(
        pte::queued(),
        queued,
        "the interrupted queue after the handler"
    );
    ensure!(
        !r.live_pte(0).map_err(failed)?.is_present(),
        "the interrupted queue was flushed by the handler"
    );
    section.leave().map_err(failed)?;
    for p in 0..SCRATCH {
        check_mapped(&r, p, p % 4)?;
    }
    check_unmapped(&r, SCRATCH)?;
    check_mapped(&r, SCRATCH + 1, 5)?;
    Ok(())
}

/// The handler-write-vs-queued-write rule and the read hazard across contexts: a handler's
/// write to an entry with a queued write lands first and the queued one overwrites it at the
/// flush; a handler's read of such an entry flushes the interrupted batch first.
pub fn irq_write_order(_ctx: &Context) -> TestOutcome {
    let r = Arc::new(marked_region(16, 4)?);
    let value = |k| r.value(Map::Frame(k)).map_err(failed);
    let added = {
        r.set_pte(0, Map::Frame(0)).map_err(failed)?;
        let v = r.live_pte(0).map_err(failed)?.raw() & !value(0)?.raw();
        r.set_pte(0, Map::None).map_err(failed)?;
        v
    };
    let stored = |k| -> Result<Pte, TestFail> { Ok(Pte::from_raw(value(k)?.raw() | added)) };

    // Write vs queued write.
    let section = pte::LazySection::enter().map_err(failed)?;
    r.set_pte(0, Map::Frame(1)).map_err(failed)?;
    let handler_log = log();
    let (l, h) = (handler_log.clone(), r.clone());
    interrupt(move || {
        let res = h.set_pte(0, Map::Frame(2)).and_then(|()| h.live_pte(0));
        l.lock().push(format!("{res:?}"));
    })?;
    let seen = take(&handler_log);
    ensure_eq!(
        seen,
        alloc::vec![format!("{:?}", Ok::<Pte, crate::mm::MmError>(stored(2)?))],
        "the handler's write is live at once"
    );
    ensure_eq!(
        r.live_pte(0).map_err(failed)?,
        stored(2)?,
        "after the handler, before the flush"
    );
    ensure_eq!(pte::queued().1, 1, "the interrupted write is still queued");
    section.leave().map_err(failed)?;
    ensure_eq!(
        r.live_pte(0).map_err(failed)?,
        stored(1)?,
        "after the flush: the queued write overwrote the handler's"
    );
    check_mapped(&r, 0, 1)?;
    println!(
        "    handler's write landed first, the interrupted section's queued write overwrote it at the leave"
    );

    // Read hazard across contexts.
    let section = pte::LazySection::enter().map_err(failed)?;
    r.set_pte(1, Map::Frame(3)).map_err(failed)?;
    r.set_pte(2, Map::Frame(3)).map_err(failed)?;
    let (l, h) = (handler_log.clone(), r.clone());
    interrupt(move || {
        let res = h.read_pte(1);
        l.lock().push(format!("{res:?}"));
    })?;
    let seen = take(&handler_log);
    ensure_eq!(
        seen,
        alloc::vec![format!("{:?}", Ok::<Pte, crate::mm::MmError>(stored(3)?))],
        "the handler's read of an entry with a queued write"
    );
    ensure_eq!(
        pte::queued(),
        (0, 0),
        "the handler's read flushed the interrupted batch"
    );
    ensure!(pte::is_active(), "the interrupted section is still open");
    section.leave().map_err(failed)?;
    check_mapped(&r, 1, 3)?;
    check_mapped(&r, 2, 3)?;
    drop_region(r)
}

fn drop_region(r: Arc<Region>) -> TestOutcome {
    ensure!(
        Arc::strong_count(&r) == 1,
        "a handler kept the region alive"
    );
    drop(r);
    Ok(())
}
