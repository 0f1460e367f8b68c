//! Lazy mode across context switches and interrupts.
//!
//! Linux keeps the lazy-MMU state per task (`task_struct::lazy_mmu_state`: an enable count and a
//! pause count, since Dec 2025) while the batch stays per CPU. Switching out a task that is
//! batching flushes the batch and suspends batching; switching in a task whose state says lazy
//! resumes batching at its depth (Xen PV: `xen_start_context_switch`/`xen_end_context_switch`).
//! No queued write crosses a switch, and the refusals of the switch's flush stay with the task
//! that queued them: its own outermost leave, flush or pause reports them.
//!
//! In interrupt context lazy mode is off (`xen_get_lazy_mode()` returns NONE when
//! `in_interrupt()`, and the generic helpers return early): a handler's writes go out at once,
//! its enter/leave/pause/resume/flush do nothing, so it cannot change the interrupted section's
//! state. A handler's read of an entry the interrupted code has a queued write to flushes first
//! (the read hazard holds across contexts; refusals of that flush stay with the interrupted
//! task). A handler's *write* to such an entry lands at once and the queued write overwrites it
//! when the batch is flushed, as in Linux, where the page-table lock keeps handlers away from
//! entries a section is changing: a handler must only write entries of its own.
//!
//! Two historical models are kept, so that what they break can be shown:
//! * [`crate::SwitchRule::WasLazyFlag`] (2023-2025): the nesting counter is per CPU and a switch saves
//!   only a "was lazy" flag (`TIF_LAZY_MMU_UPDATES`). Switching out leaves lazy mode once; at a
//!   depth of 2 or more the CPU is still in lazy MMU mode when the switch enters its own lazy CPU
//!   mode, and `enter_lazy()` hits `BUG_ON(old_mode != XEN_LAZY_NONE)`.
//! * [`crate::IrqRule::BatchIntoInterrupted`]: before lazy mode was off in interrupt context, a
//!   handler's writes joined the interrupted code's batch: a handler that maps a page and uses
//!   it at once touches a mapping that does not exist yet.

use crate::counters::FlushReason;
use crate::hypervisor::Hypervisor;
use crate::report::{Collected, MmuError};
use crate::rules::{Rules, SwitchRule};
use crate::state::{LazyMmu, LazyState};

/// A task's lazy-MMU state while it is switched out.
#[derive(Clone, Copy, Debug)]
pub struct TaskLazy {
    state: LazyState,
    /// Refusals of its batches not yet reported to it.
    pending: Collected,
    /// [`crate::SwitchRule::WasLazyFlag`]: it was batching when switched out.
    was_lazy: bool,
}

impl TaskLazy {
    /// A new task: not in a lazy section.
    pub const NEW: TaskLazy = TaskLazy {
        state: LazyState {
            enable: 0,
            pause: 0,
        },
        pending: Collected::NONE,
        was_lazy: false,
    };

    pub fn state(&self) -> LazyState {
        self.state
    }

    /// Refusals waiting to be reported to this task.
    pub fn pending_refusals(&self) -> u32 {
        self.pending.count
    }
}

impl Default for TaskLazy {
    fn default() -> Self {
        TaskLazy::NEW
    }
}

impl<H: Hypervisor, const E: usize, const R: usize> LazyMmu<H, E, R> {
    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }

    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// In an interrupt handler?
    pub fn in_interrupt(&self) -> bool {
        self.irq_depth > 0
    }

    /// Switch the current task out (Linux: `xen_start_context_switch`): flush what it queued
    /// (the refusals stay with it) and hand back its state. The caller keeps the state with
    /// the task and gives it to [`LazyMmu::switch_in`] when the task runs again. Switches
    /// happen in task context, never inside an interrupt handler.
    pub fn switch_out(&mut self) -> Result<TaskLazy, MmuError> {
        if self.irq_depth > 0 {
            return Err(MmuError::SwitchInInterrupt);
        }
        if self.state.is_active() {
            self.flush_deferred(FlushReason::ContextSwitch);
        }
        let pending = core::mem::replace(&mut self.pending, Collected::NONE);
        match self.rules.switch {
            SwitchRule::PerTask => {
                let state = core::mem::take(&mut self.state);
                Ok(TaskLazy {
                    state,
                    pending,
                    was_lazy: false,
                })
            }
            SwitchRule::WasLazyFlag => {
                // arch_leave_lazy_mmu_mode(): leave_lazy(MMU) drops one nesting level; the
                // counter stays with the CPU. Then enter_lazy(XEN_LAZY_CPU) insists that the
                // CPU is in no lazy mode.
                let was_lazy = self.state.is_active();
                if was_lazy {
                    self.state.enable -= 1;
                    if self.state.enable > 0 {
                        return Err(MmuError::LazyModeAtSwitch {
                            nesting: u32::from(self.state.enable),
                        });
                    }
                }
                Ok(TaskLazy {
                    state: LazyState {
                        enable: 0,
                        pause: self.state.pause,
                    },
                    pending,
                    was_lazy,
                })
            }
        }
    }

    /// Switch a task in (Linux: `xen_end_context_switch`): batching resumes at its depth.
    pub fn switch_in(&mut self, task: TaskLazy) -> Result<(), MmuError> {
        if self.irq_depth > 0 {
            return Err(MmuError::SwitchInInterrupt);
        }
        debug_assert!(self.queue.is_empty(), "a queued write would cross a switch");
        self.pending = task.pending;
        match self.rules.switch {
            SwitchRule::PerTask => self.state = task.state,
            SwitchRule::WasLazyFlag => {
                // The CPU's counter is whatever the previous task left; the flag re-enters once.
                if task.was_lazy {
                    self.state.enable = self.state.enable.saturating_add(1);
                }
            }
        }
        Ok(())
    }

    /// An interrupt handler starts on this vCPU.
    pub fn irq_enter(&mut self) {
        self.irq_depth = self.irq_depth.saturating_add(1);
    }

    /// The handler ends.
    pub fn irq_exit(&mut self) -> Result<(), MmuError> {
        self.irq_depth = self
            .irq_depth
            .checked_sub(1)
            .ok_or(MmuError::UnbalancedIrqExit)?;
        Ok(())
    }
}
