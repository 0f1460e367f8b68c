//! Issuing the batch, and replaying what a refusal held up.
//!
//! Xen's rules: `mmu_update` and `mmuext_op` stop at the first failing request (`pdone` says
//! how many were done); a multicall runs every entry and writes each entry's own result.
//!
//! So when a request in the middle of an entry is refused, the requests behind it in that entry
//! did not run, while every later entry did: they ran *early*. The flush then issues the rest,
//! from the request after the refused one to the end of the batch, again (one multicall), and
//! repeats until nothing is held up. Running a later entry twice, once early and once in order,
//! ends in the queue-order result because of what a batch may hold:
//!
//! * leaf writes, `update_va_mapping` and TLB operations: idempotent, and whether Xen accepts one
//!   does not depend on the others (a leaf write only takes or drops a *writable* type reference,
//!   which never changes whether another leaf write is accepted);
//! * requests that change page types (a table hook or unhook, a pin, an unpin) only at the
//!   start of an entry, and only where nothing before them can be held up: queuing one flushes
//!   the batch first if some entry holds several requests ([`FlushReason::TypeChange`]). A type
//!   change never runs early or late, and is never reissued (the replay starts after the
//!   refused request).
//!
//! Refusals are recorded in queue order; results of entries that ran early are ignored, since
//! they run again in order.

use hypercalls::abi::{MmuUpdate, MmuextOp};
use hypercalls::{PartialFailure, Pte, XenError};
use x86_64::VirtAddr;

use crate::counters::{Counters, FlushReason};
use crate::hypervisor::{EntryOutcome, Hypervisor, MulticallFailure};
use crate::report::{Collected, Refusal};
use crate::request::{Entry, Request};
use crate::state::LazyMmu;

/// An entry still to issue: `entry` (perhaps the tail of a queued one) and where its requests'
/// indices count from in the queued entry `index` (for reports).
#[derive(Clone, Copy)]
struct Todo {
    entry: Entry,
    index: u16,
    base: usize,
}

impl<H: Hypervisor, const E: usize, const R: usize> LazyMmu<H, E, R> {
    /// Issue the queue: directly if it holds one entry, as a multicall otherwise; check every
    /// result, reissue what a refusal held up, and empty the queue.
    pub(crate) fn flush_queue(&mut self, reason: FlushReason) -> Collected {
        let mut refused = Collected::new(Some(reason));
        if self.queue.is_empty() {
            return refused;
        }
        self.counters.flushes[reason as usize] += 1;
        let mut todo = [Todo {
            entry: Entry::Updates { first: 0, count: 0 },
            index: 0,
            base: 0,
        }; E];
        let n = self.queue.entries().len();
        for (i, (t, e)) in todo.iter_mut().zip(self.queue.entries()).enumerate() {
            *t = Todo {
                entry: *e,
                index: i as u16,
                base: e.first(),
            };
        }
        let mut start = 0;
        while start < n {
            start = self
                .issue_round(&mut todo[start..n], &mut refused)
                .map_or(n, |next| start + next);
        }
        self.queue.clear();
        self.counters.rejected += u64::from(refused.count);
        refused
    }

    /// Issue `todo` once (as a multicall when it has several entries). Returns where to carry
    /// on if something is left: `todo[next]` then holds what remains of its entry.
    fn issue_round(&mut self, todo: &mut [Todo], refused: &mut Collected) -> Option<usize> {
        if let [one] = todo {
            self.issue_todo(*one, refused);
            return None;
        }
        let mut entries = [Entry::Updates { first: 0, count: 0 }; E];
        for (e, t) in entries.iter_mut().zip(todo.iter()) {
            *e = t.entry;
        }
        let entries = &entries[..todo.len()];
        let mut outcomes = [EntryOutcome::default(); E];
        let outcomes = &mut outcomes[..todo.len()];
        self.count_multicall(entries);
        let batch = self.queue.batch_of(entries);
        let ran = match self.hv.multicall(batch, outcomes) {
            Ok(()) => todo.len(),
            Err(MulticallFailure { ran, .. }) => {
                self.counters.multicall_failures += 1;
                ran.min(todo.len())
            }
        };
        for (i, (t, o)) in todo.iter_mut().zip(outcomes.iter()).enumerate().take(ran) {
            if o.result >= 0 {
                continue;
            }
            let error = XenError::from_errno(o.result);
            let done = o.done as usize;
            if done >= t.entry.len() {
                refused.push(self.whole_entry_refusal(*t, error));
                continue;
            }
            refused.push(self.refusal(*t, done, error));
            if done + 1 < t.entry.len() {
                // Requests behind the refused one were held up, and later entries ran early:
                // carry on from the next request, in order.
                t.entry = t.entry.skip(done + 1);
                self.counters.replays += 1;
                return Some(i);
            }
        }
        if ran == todo.len() {
            return None;
        }
        if ran == 0 {
            // Xen could not run the list at all: one hypercall per entry, in order.
            for t in todo.iter() {
                self.issue_todo(*t, refused);
            }
            return None;
        }
        Some(ran)
    }

    fn count_multicall(&mut self, entries: &[Entry]) {
        let c = &mut self.counters;
        c.hypercalls += 1;
        c.multicalls += 1;
        c.multicall_entries += entries.len() as u64;
        for e in entries {
            match e {
                Entry::Updates { count, .. } => c.requests += u64::from(*count),
                Entry::TableOps { count, .. } => c.other_ops += u64::from(*count),
                Entry::UpdateVaMapping { .. } => c.other_ops += 1,
            }
        }
    }

    /// The refusal of request `at` of `t`'s entry.
    fn refusal(&self, t: Todo, at: usize, error: XenError) -> Refusal {
        let global = t.entry.first() + at;
        let request = match t.entry {
            Entry::Updates { .. } => self.queue.request(global),
            Entry::TableOps { .. } => Request::TableOp(self.queue.table_op(global)),
            Entry::UpdateVaMapping { va, val, flags } => {
                Request::UpdateVaMapping { va, val, flags }
            }
        };
        Refusal {
            entry: t.index,
            index: (global - t.base) as u32,
            request: Some(request),
            error,
        }
    }

    fn whole_entry_refusal(&self, t: Todo, error: XenError) -> Refusal {
        Refusal {
            entry: t.index,
            index: (t.entry.first() + t.entry.len() - t.base) as u32,
            request: None,
            error,
        }
    }

    /// Issue one (queued) entry as its own hypercall, carrying on past refusals.
    fn issue_todo(&mut self, t: Todo, refused: &mut Collected) {
        let queue = &self.queue;
        let mut issuer = Issuer {
            hv: &mut self.hv,
            counters: &mut self.counters,
        };
        match t.entry {
            Entry::Updates { first, count } => {
                let range = first as usize..first as usize + count as usize;
                issuer.submit(
                    t.index,
                    &queue.requests()[range.clone()],
                    |i| (i + range.start - t.base, queue.request(range.start + i)),
                    refused,
                );
            }
            Entry::TableOps { first, count } => {
                let range = first as usize..first as usize + count as usize;
                issuer.submit(
                    t.index,
                    &queue.ops()[range.clone()],
                    |i| {
                        let op = queue.table_op(range.start + i);
                        (i + range.start - t.base, Request::TableOp(op))
                    },
                    refused,
                );
            }
            Entry::UpdateVaMapping { va, val, flags } => {
                issuer.update_va_mapping(t.index, va, val, flags, refused)
            }
        }
    }

    /// Issue `reqs` (or ops) at once as one hypercall that carries on past refusals.
    /// `name(i)` is request `i`'s index in its entry and the request.
    pub(crate) fn issue_now<T: Submit>(
        &mut self,
        reqs: &[T],
        name: impl Fn(usize) -> (usize, Request),
        refused: &mut Collected,
    ) {
        let mut issuer = Issuer {
            hv: &mut self.hv,
            counters: &mut self.counters,
        };
        let before = refused.count;
        issuer.submit(0, reqs, name, refused);
        self.counters.rejected += u64::from(refused.count - before);
    }

    /// One `update_va_mapping` at once.
    pub(crate) fn issue_va_update_now(
        &mut self,
        va: VirtAddr,
        val: Pte,
        flags: u64,
        refused: &mut Collected,
    ) {
        let mut issuer = Issuer {
            hv: &mut self.hv,
            counters: &mut self.counters,
        };
        let before = refused.count;
        issuer.update_va_mapping(0, va, val, flags, refused);
        self.counters.rejected += u64::from(refused.count - before);
    }
}

/// The arrays `mmu_update` and `mmuext_op` take.
pub(crate) trait Submit: Sized {
    fn issue<H: Hypervisor>(hv: &mut H, reqs: &[Self]) -> Result<(), PartialFailure>;
    fn count(counters: &mut Counters, n: usize);
}

impl Submit for MmuUpdate {
    fn issue<H: Hypervisor>(hv: &mut H, reqs: &[Self]) -> Result<(), PartialFailure> {
        hv.mmu_update(reqs)
    }
    fn count(counters: &mut Counters, n: usize) {
        counters.requests += n as u64;
    }
}

impl Submit for MmuextOp {
    fn issue<H: Hypervisor>(hv: &mut H, reqs: &[Self]) -> Result<(), PartialFailure> {
        hv.mmuext_op(reqs)
    }
    fn count(counters: &mut Counters, n: usize) {
        counters.other_ops += n as u64;
    }
}

/// Issues hypercalls and keeps the counters (borrowed apart from the queue).
struct Issuer<'a, H: Hypervisor> {
    hv: &'a mut H,
    counters: &'a mut Counters,
}

impl<H: Hypervisor> Issuer<'_, H> {
    /// `reqs` as one hypercall, resubmitting after each refused request until all ran.
    fn submit<T: Submit>(
        &mut self,
        entry: u16,
        reqs: &[T],
        name: impl Fn(usize) -> (usize, Request),
        refused: &mut Collected,
    ) {
        let mut from = 0;
        while from < reqs.len() {
            if from > 0 {
                self.counters.replays += 1;
            }
            self.counters.hypercalls += 1;
            T::count(self.counters, reqs.len() - from);
            let Err(PartialFailure { done, error }) = T::issue(self.hv, &reqs[from..]) else {
                break;
            };
            let at = from.saturating_add(done as usize);
            if at >= reqs.len() {
                // Xen failed after doing everything: no request is to blame.
                let (index, _) = name(reqs.len() - 1);
                refused.push(Refusal {
                    entry,
                    index: index as u32 + 1,
                    request: None,
                    error,
                });
                break;
            }
            let (index, request) = name(at);
            refused.push(Refusal {
                entry,
                index: index as u32,
                request: Some(request),
                error,
            });
            from = at + 1;
        }
    }

    fn update_va_mapping(
        &mut self,
        entry: u16,
        va: VirtAddr,
        val: Pte,
        flags: u64,
        refused: &mut Collected,
    ) {
        self.counters.hypercalls += 1;
        self.counters.other_ops += 1;
        if let Err(error) = self.hv.update_va_mapping(va, val, flags) {
            refused.push(Refusal {
                entry,
                index: 0,
                request: Some(Request::UpdateVaMapping { va, val, flags }),
                error,
            });
        }
    }
}
