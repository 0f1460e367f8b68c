//! Which model of lazy mode across switches and interrupts a [`crate::LazyMmu`] follows: today's
//! Linux, or one of the historical models kept to show what they break (see `context`).

/// What a switch does with lazy state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchRule {
    /// Linux since Dec 2025: the whole state (enable and pause counts) is the task's.
    PerTask,
    /// Linux 2023-2025 on Xen PV: a per-CPU nesting counter and a per-task "was lazy" flag.
    WasLazyFlag,
}

/// What an interrupt handler's page-table writes do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqRule {
    /// Linux: lazy mode is off in interrupt context; writes go out at once.
    Immediate,
    /// The old bug: the handler's writes join the interrupted code's batch.
    BatchIntoInterrupted,
}

/// The rules a [`LazyMmu`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    pub switch: SwitchRule,
    pub irq: IrqRule,
}

impl Rules {
    /// Today's Linux.
    pub const LINUX: Rules = Rules {
        switch: SwitchRule::PerTask,
        irq: IrqRule::Immediate,
    };
}
