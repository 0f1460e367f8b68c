//! What the batching did, for tests and the benchmark.

/// How many flush reasons there are.
pub const N_REASONS: usize = 8;

/// Why a flush happened; counted per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// The buffer had no room for the next request.
    Full,
    /// The outermost leave.
    Leave,
    /// A nested leave (Linux's fix: every leave flushes).
    NestedLeave,
    /// `flush()`.
    Explicit,
    /// A read of an entry with a queued write.
    ReadHazard,
    /// `pause()`.
    Pause,
    /// A request that changes page types (a table hook, a pin, an unpin) is queued only behind
    /// requests Xen has confirmed, so that a refusal can never let it run out of order.
    TypeChange,
    /// The task that queued the batch is switched out.
    ContextSwitch,
}

impl FlushReason {
    pub const ALL: [FlushReason; N_REASONS] = [
        FlushReason::Full,
        FlushReason::Leave,
        FlushReason::NestedLeave,
        FlushReason::Explicit,
        FlushReason::ReadHazard,
        FlushReason::Pause,
        FlushReason::TypeChange,
        FlushReason::ContextSwitch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FlushReason::Full => "full",
            FlushReason::Leave => "leave",
            FlushReason::NestedLeave => "nested-leave",
            FlushReason::Explicit => "explicit",
            FlushReason::ReadHazard => "read-hazard",
            FlushReason::Pause => "pause",
            FlushReason::TypeChange => "type-change",
            FlushReason::ContextSwitch => "context-switch",
        }
    }
}

/// Counts of what the batching did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Hypercalls issued (a multicall counts once).
    pub hypercalls: u64,
    /// Of those, multicalls.
    pub multicalls: u64,
    /// Multicall entries issued (inside multicalls).
    pub multicall_entries: u64,
    /// `mmu_update` requests handed to Xen (including resubmissions).
    pub requests: u64,
    /// Other operations (mmuext, update_va_mapping) handed to Xen.
    pub other_ops: u64,
    /// Non-empty flushes by reason, indexed like [`FlushReason::ALL`].
    pub flushes: [u64; N_REASONS],
    /// Requests Xen refused.
    pub rejected: u64,
    /// Hypercalls that reissued what a refusal held up.
    pub replays: u64,
    /// Multicalls Xen stopped part-way (the rest was issued again).
    pub multicall_failures: u64,
}

impl Counters {
    pub const ZERO: Counters = Counters {
        hypercalls: 0,
        multicalls: 0,
        multicall_entries: 0,
        requests: 0,
        other_ops: 0,
        flushes: [0; N_REASONS],
        rejected: 0,
        replays: 0,
        multicall_failures: 0,
    };

    pub fn flushes_for(&self, reason: FlushReason) -> u64 {
        self.flushes[reason as usize]
    }

    /// What happened between `earlier` (a snapshot of the same counters) and `self`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut flushes = [0; N_REASONS];
        for (d, (now, then)) in flushes
            .iter_mut()
            .zip(self.flushes.iter().zip(&earlier.flushes))
        {
            *d = now.wrapping_sub(*then);
        }
        Counters {
            hypercalls: self.hypercalls.wrapping_sub(earlier.hypercalls),
            multicalls: self.multicalls.wrapping_sub(earlier.multicalls),
            multicall_entries: self
                .multicall_entries
                .wrapping_sub(earlier.multicall_entries),
            requests: self.requests.wrapping_sub(earlier.requests),
            other_ops: self.other_ops.wrapping_sub(earlier.other_ops),
            flushes,
            rejected: self.rejected.wrapping_sub(earlier.rejected),
            replays: self.replays.wrapping_sub(earlier.replays),
            multicall_failures: self
                .multicall_failures
                .wrapping_sub(earlier.multicall_failures),
        }
    }
}
