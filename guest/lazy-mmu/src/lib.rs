//! Linux's lazy MMU mode for a Xen PV guest, as hardware-independent code.
//!
//! * [`LazyMmu`] (`state`, `flush`): the nesting state machine (Linux's generic
//!   `lazy_mmu_mode_enable/disable/pause/resume`, an enable count and a pause count) over one
//!   vCPU's batch, and the flush that issues it and replays what a refusal held up.
//! * [`queue`]: the fixed-size batch: multicall entries, with consecutive `mmu_update`s and
//!   consecutive TLB operations coalesced (Linux: `xen_extend_mmu_update`/`_mmuext_op`).
//! * [`report`]: refusals and errors, named down to the request.
//! * [`Hypervisor`]: the few hypercalls the batch needs; the kernel implements it over real Xen,
//!   [`model::Model`] over a simulation of Xen's PV MMU rules.
//! * [`program`], [`exhaustive`]: random and exhaustive lazy-MMU programs checked against the
//!   strict in-order reference, on the host against the model and in the guest against Xen.
//!
//! No `unsafe` here: everything that touches hardware lives in the kernel.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod context;
pub mod counters;
pub mod exhaustive;
pub mod hypervisor;
pub mod model;
pub mod program;
pub mod queue;
pub mod report;
pub mod request;
pub mod rules;

mod flush;
mod state;

pub use context::TaskLazy;
pub use counters::{Counters, FlushReason};
pub use hypervisor::{Batch, EntryOutcome, Hypervisor, MulticallFailure, ReadError};
pub use queue::{DEFAULT_ENTRIES, DEFAULT_REQUESTS, LINUX_ENTRIES, LINUX_REQUESTS, Queue};
pub use report::{MAX_REPORTED, MmuError, Refusal, Refusals, SetPtesRule};
pub use request::{Entry, Request, TableLevel, TableOp};
pub use rules::{IrqRule, Rules, SwitchRule};
pub use state::{LazyMmu, LazyState, NESTING_LIMIT, check_set_ptes};
