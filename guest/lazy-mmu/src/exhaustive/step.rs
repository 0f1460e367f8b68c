//! One call of a program on both worlds, and the rules checked after it.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hypercalls::{Pte, XenError};

use super::world::{World, issue};
use super::{Expected, Node, Stats, Step, Sym};
use crate::hypervisor::Hypervisor;
use crate::model::{Model, mfn};
use crate::report::MmuError;
use crate::request::Request;
use crate::state::LazyMmu;

/// Run `sym` on both worlds and check the rules.
pub(crate) fn step<const E: usize, const R: usize>(
    world: &World,
    node: &mut Node<E, R>,
    sym: Sym,
    stats: &mut Stats,
) -> Result<Step, String> {
    let lazy = &mut node.lazy;
    let before = lazy.state();
    let counters = lazy.counters();
    let queued = (lazy.queued_entries(), lazy.queued_requests());
    let pending = lazy.pending_refusals();
    let active = before.is_active();

    // The reference: each request at once, in order.
    let requests = world.requests(sym);
    let mut refused = Vec::new();
    for r in &requests {
        if let Err(e) = issue(&mut node.reference, *r) {
            refused.push((*r, e));
        }
    }

    // The call under test, and which refusals it must report (`None`: none, not even an
    // empty report; it must succeed).
    let outermost_leave = before.pause == 0 && before.enable == 1;
    let (result, report): (Result<(), MmuError>, Option<Expected>) = match sym {
        Sym::Enter => (lazy.enter(), None),
        Sym::Leave if before.pause == 0 && before.enable == 0 => {
            let r = lazy.leave();
            if r != Err(MmuError::UnbalancedLeave) {
                return Err(format!("unbalanced leave returned {r:?}"));
            }
            (Ok(()), None)
        }
        Sym::Leave => (lazy.leave(), outermost_leave.then(Vec::new)),
        Sym::Pause => (
            lazy.pause(),
            (before.pause == 0 && before.enable > 0).then(Vec::new),
        ),
        Sym::Resume if before.pause == 0 => {
            let r = lazy.resume();
            if r != Err(MmuError::UnbalancedResume) {
                return Err(format!("unbalanced resume returned {r:?}"));
            }
            (Ok(()), None)
        }
        Sym::Resume => (lazy.resume(), None),
        Sym::Flush => (lazy.flush(), Some(Vec::new())),
        Sym::Read => {
            let (ptr, _) = world.slot(0);
            let found = lazy.read_pte(ptr).map_err(|e| format!("read: {e}"))?;
            let expected = node
                .reference
                .read_pte(ptr)
                .map_err(|e| format!("reference read: {e:?}"))?;
            if found != expected {
                return Err(format!("read {found}, the reference holds {expected}"));
            }
            (Ok(()), None)
        }
        Sym::Switch => {
            stats.switches_in_sections += u64::from(active);
            let out = lazy.switch_out().map_err(|e| format!("switch out: {e}"))?;
            lazy.switch_in(node.saved)
                .map_err(|e| format!("switch in: {e}"))?;
            node.saved = out;
            node.current ^= 1;
            (Ok(()), None)
        }
        Sym::Irq => {
            stats.interrupts_in_sections += u64::from(active);
            interrupt(world, lazy, &mut node.reference)?;
            (Ok(()), None)
        }
        Sym::SetPtes2 => {
            let (ptr, va) = world.slot(0);
            let first = world.spare_writable();
            let r = lazy.set_ptes(va, ptr, 2, |i| first.with_mfn(mfn(first.mfn().get() + i)));
            // Paused: issued at once; outside any section: its own leave is the outermost.
            let reports = !active;
            (r, reports.then(Vec::new))
        }
        _ => {
            let r = match requests.first() {
                Some(Request::SetPte { ptr, val, va }) => lazy.set_pte(*ptr, *val, *va),
                Some(Request::SetTableEntry { ptr, val }) => lazy.set_table_entry(*ptr, *val),
                Some(Request::TableOp(op)) => lazy.table_op(*op),
                _ => return Err(format!("{sym:?} makes no request")),
            };
            (r, (!active).then(Vec::new))
        }
    };

    // Where the reference's refusals go: to this call if nothing batched them, else to the
    // call that ends the batching.
    let batched = active && !requests.is_empty();
    let outstanding = &mut node.outstanding[node.current];
    if batched {
        outstanding.extend(refused.iter().copied());
    }
    match report {
        None => {
            if !refused.is_empty() && !batched {
                return Err(format!(
                    "{refused:?} refused, but this call reports nothing"
                ));
            }
            if let Err(e) = result {
                return Err(format!("unexpected error: {e}"));
            }
        }
        Some(_) => {
            let mut expected = core::mem::take(outstanding);
            if !batched {
                expected.extend(refused.iter().copied());
            }
            check_report(lazy, result, &expected)?;
            if !expected.is_empty() {
                stats.reports += 1;
                stats.refusals += expected.len() as u64;
            }
        }
    }

    let after = lazy.counters();
    let delta = after.since(&counters);
    stats.replays += delta.replays;
    let in_section = active && lazy.is_active() && sym != Sym::Irq;
    if in_section && delta.hypercalls > 0 && delta.flushes.iter().sum::<u64>() == 0 {
        return Err(format!(
            "{} hypercall(s) inside a lazy section without a flush",
            delta.hypercalls
        ));
    }
    if lazy.queued_entries() == 0 && !lazy.hypervisor().same_tables(&node.reference) {
        return Err(String::from(
            "the batch is empty but the tables differ from the reference",
        ));
    }
    let unchanged = delta.hypercalls == 0
        && requests.is_empty()
        && sym != Sym::Switch
        && lazy.state() == before
        && (lazy.queued_entries(), lazy.queued_requests()) == queued
        && lazy.pending_refusals() == pending;
    Ok(if unchanged { Step::NoOp } else { Step::Changed })
}

/// An interrupt: the handler maps its own slot 2, reads slot 0, tries the section calls, and
/// clears slot 2. Its writes go out at once; it leaves the interrupted state as it found it.
fn interrupt<const E: usize, const R: usize>(
    world: &World,
    lazy: &mut LazyMmu<Model, E, R>,
    reference: &mut Model,
) -> Result<(), String> {
    let before = lazy.state();
    let queued = lazy.queued_requests();
    let (ptr, va) = world.slot(2);
    let (slot0, _) = world.slot(0);
    let mapped = world.data(3);
    lazy.irq_enter();
    for val in [mapped, Pte::NONE] {
        lazy.set_pte(ptr, val, va)
            .map_err(|e| format!("handler write: {e}"))?;
        issue(reference, Request::SetPte { ptr, val, va })
            .map_err(|e| format!("reference handler write: {e}"))?;
        let live = lazy
            .hypervisor()
            .read_pte(ptr)
            .map_err(|e| format!("{e:?}"))?;
        if live != val {
            return Err(format!(
                "the handler's write of {val} is not live at once ({live})"
            ));
        }
        if val == mapped {
            let found = lazy
                .read_pte(slot0)
                .map_err(|e| format!("handler read: {e}"))?;
            let expected = reference.read_pte(slot0).map_err(|e| format!("{e:?}"))?;
            if found != expected {
                return Err(format!(
                    "handler read {found}, the reference holds {expected}"
                ));
            }
            let calls = [
                lazy.enter(),
                lazy.flush(),
                lazy.pause(),
                lazy.resume(),
                lazy.leave(),
            ];
            if let Some(Err(e)) = calls.iter().find(|r| r.is_err()) {
                return Err(format!("section call in a handler: {e}"));
            }
        }
    }
    lazy.irq_exit().map_err(|e| format!("{e}"))?;
    if lazy.state() != before || lazy.queued_requests() > queued {
        return Err(String::from(
            "the handler changed the interrupted lazy state or queue",
        ));
    }
    Ok(())
}

/// A reporting call returned exactly `expected`, in order.
fn check_report<const E: usize, const R: usize>(
    lazy: &LazyMmu<Model, E, R>,
    result: Result<(), MmuError>,
    expected: &[(Request, XenError)],
) -> Result<(), String> {
    match result {
        Ok(()) if expected.is_empty() => Ok(()),
        Ok(()) => Err(format!("reported nothing; expected {expected:?}")),
        Err(MmuError::Refused(r)) => {
            if r.count as usize != expected.len() {
                return Err(format!(
                    "reported {} refusal(s), expected {}: {expected:?} (first reported: {})",
                    r.count,
                    expected.len(),
                    r.first
                ));
            }
            let listed: Vec<(Option<Request>, XenError)> =
                lazy.last_refusals().map(|f| (f.request, f.error)).collect();
            let want: Vec<(Option<Request>, XenError)> = expected
                .iter()
                .take(crate::MAX_REPORTED)
                .map(|(r, e)| (Some(*r), *e))
                .collect();
            if listed != want {
                return Err(format!("listed {listed:?}, expected {want:?}"));
            }
            if lazy.last_refusals().next() != Some(&r.first) {
                return Err(format!(
                    "the error's first refusal {} is not listed first",
                    r.first
                ));
            }
            Ok(())
        }
        Err(e) => Err(format!("unexpected error: {e}")),
    }
}
