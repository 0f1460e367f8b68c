//! The in-guest tests, one small file per topic, through the kernel's safe APIs only. To add
//! one: write `fn(&Context) -> TestOutcome` in a file here and list it in [`TESTS`].
#![forbid(unsafe_code)]

use crate::framework::runner::{Context, TestCase, TestOutcome};

mod api;
mod batching;
mod boot_info;
mod console;
mod eager;
mod faults;
mod frames;
mod heap;
mod interrupts;
mod nesting;
mod preempt;
mod refusals;
mod set_ptes;
mod stress;
mod tasks;
mod util;

const fn test(
    name: &'static str,
    about: &'static str,
    run: fn(&Context) -> TestOutcome,
) -> TestCase {
    TestCase {
        name,
        about,
        run,
        crashes: false,
    }
}

const fn crash(
    name: &'static str,
    about: &'static str,
    run: fn(&Context) -> TestOutcome,
) -> TestCase {
    TestCase {
        crashes: true,
        ..test(name, about, run)
    }
}

/// Every in-guest test, in the order a full run takes them.
pub static TESTS: &[TestCase] = &[
    test(
        "console",
        "console output reaches the backend",
        console::console,
    ),
    test(
        "start_info",
        "start_info facts are consistent with P2M/M2P",
        boot_info::start_info,
    ),
    test(
        "hypercall_page",
        "Xen filled the hypercall page; xen_version answers",
        boot_info::hypercall_page,
    ),
    test(
        "heap",
        "Vec/Box round trip through the allocator",
        heap::heap,
    ),
    test(
        "page_fault",
        "a deliberate #PF is caught, reported and recovered from",
        faults::page_fault,
    ),
    test(
        "eager_set_pte",
        "outside lazy mode one set_pte is one mmu_update",
        eager::eager_set_pte,
    ),
    test(
        "lazy_batch",
        "512 writes in a section: no hypercall before leave, one after",
        batching::lazy_batch,
    ),
    test(
        "move_ptes",
        "move_ptes()-like loop with nested set_ptes across an L1 boundary",
        nesting::move_ptes,
    ),
    test(
        "buffer_overflow",
        "a section larger than the buffer flushes once when full",
        batching::buffer_overflow,
    ),
    test(
        "nested_sections",
        "8-deep nesting, writes at every level, every leave flushes",
        nesting::nested_sections,
    ),
    test(
        "invalid_request",
        "a refused request mid-batch is reported exactly, the rest applied",
        refusals::invalid_request,
    ),
    test(
        "paused_set_ptes",
        "set_ptes of [ok, refused, ok] applies 0 and 2 and reports 1, paused or not",
        refusals::paused_set_ptes,
    ),
    test(
        "type_order",
        "a refusal before a write and a table hook: queue order, both refusals named",
        refusals::type_order,
    ),
    test(
        "set_ptes_consecutive",
        "set_ptes with nr > 1 maps consecutive frames",
        set_ptes::set_ptes_consecutive,
    ),
    test(
        "api_misuse",
        "set_ptes contract (incl. an overflowing nr) refused, nothing queued or lost",
        set_ptes::api_misuse,
    ),
    test(
        "ptep_get_any_frame",
        "ptep_get reads any frame of the domain; other frames are an error, not a #PF",
        frames::ptep_get_any_frame,
    ),
    test(
        "set_ptes_bad_frame",
        "set_ptes with a machine frame that is not the domain's is refused, not a #PF",
        set_ptes::set_ptes_bad_frame,
    ),
    test(
        "stress",
        "seeded random lazy-MMU programs checked against a shadow (seed= ops= depth=)",
        stress::stress,
    ),
    test(
        "timer",
        "VIRQ_TIMER with one-shot deadlines ticks at hz= (default 1000) for 50 ms or 10 periods",
        interrupts::timer,
    ),
    test(
        "upcall_in_lazy",
        "an upcall inside a section: lazy mode off in the handler, the queue untouched",
        interrupts::upcall_in_lazy,
    ),
    test(
        "irq_scratch_page",
        "a handler maps, reads and unmaps its scratch page next to queued writes",
        interrupts::irq_scratch_page,
    ),
    test(
        "irq_write_order",
        "a handler's write lands first, the queued one overwrites it; a handler's read flushes",
        interrupts::irq_write_order,
    ),
    test(
        "switch_depths",
        "task switches at depth 0, 1, 2, 3 and paused: flushed, state kept, batching resumed",
        tasks::switch_depths,
    ),
    test(
        "refusal_stays_with_task",
        "a refusal flushed by A's switch-out is reported by A's leave, not to B",
        tasks::refusal_stays_with_task,
    ),
    test(
        "preempt_nested",
        "a task preempted by the timer at depth 2: write flushed, depth kept",
        tasks::preempt_nested,
    ),
    test(
        "preempt",
        "seeded programs in preempted tasks, a handler writing its range (seed= tasks= hz= ops= depth=)",
        preempt::preempt,
    ),
    test(
        "image_frames",
        "every frame below the first free one reads as an entry, also after a peek",
        api::image_frames,
    ),
    test(
        "set_each_reads",
        "set_each's closure may read page-table entries",
        api::set_each_reads,
    ),
    test(
        "region_drop_in_section",
        "a region dropped inside a section keeps the section's refusals",
        api::region_drop_in_section,
    ),
    test(
        "old_refusal_teardown",
        "an old pending refusal neither fails a region's teardown nor is consumed by it",
        api::old_refusal_teardown,
    ),
    test(
        "section_leave_paused",
        "LazySection::leave while paused inside it is LeaveWhilePaused",
        api::section_leave_paused,
    ),
    test(
        "region_limits",
        "oversized regions are refused before taking or mapping frames",
        api::region_limits,
    ),
    test(
        "region_indices",
        "out-of-range pages, words and blocks are errors; a block is hooked once",
        api::region_indices,
    ),
    test(
        "program_bounds",
        "programs and own batches beyond the region are refused up front",
        api::program_bounds,
    ),
    crash(
        "bug_task_panic",
        "a task that panics is reported with its name",
        tasks::bug_task_panic,
    ),
    crash(
        "bug_privileged_instruction",
        "invlpg in a ring-3 PV kernel raises #GP and is reported",
        faults::bug_privileged_instruction,
    ),
    crash(
        "bug_unbalanced_leave",
        "an unbalanced leave through the kernel API is a BUG",
        nesting::bug_unbalanced_leave,
    ),
];
