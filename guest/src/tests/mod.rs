//! The in-guest tests, one file per subject. To add one: write `fn(&Context) -> TestOutcome` in a
//! file here and list it in `TESTS`.

use crate::testing::TestCase;

mod basics;
mod frames;
mod lazy_mmu;
mod stress;

const fn test(
    name: &'static str,
    about: &'static str,
    run: fn(&crate::testing::Context) -> crate::testing::TestOutcome,
) -> TestCase {
    TestCase {
        name,
        about,
        run,
        crashes: false,
    }
}

/// Every in-guest test, in the order a full run takes them.
pub static TESTS: &[TestCase] = &[
    test(
        "console",
        "console output reaches the backend",
        basics::console,
    ),
    test(
        "start_info",
        "start_info facts are consistent with P2M/M2P",
        basics::start_info,
    ),
    test(
        "hypercall_page",
        "Xen filled the hypercall page; xen_version answers",
        basics::hypercall_page,
    ),
    test(
        "heap",
        "Vec/Box round trip through the allocator",
        basics::heap,
    ),
    test(
        "page_fault",
        "a deliberate #PF is caught, reported and recovered from",
        basics::page_fault,
    ),
    test(
        "eager_set_pte",
        "outside lazy mode one set_pte is one mmu_update",
        lazy_mmu::eager_set_pte,
    ),
    test(
        "lazy_batch",
        "512 writes in a section: no hypercall before leave, one after",
        lazy_mmu::lazy_batch,
    ),
    test(
        "move_ptes",
        "move_ptes()-like loop with nested set_ptes across an L1 boundary",
        lazy_mmu::move_ptes,
    ),
    test(
        "buffer_overflow",
        "a section larger than the buffer flushes once when full",
        lazy_mmu::buffer_overflow,
    ),
    test(
        "nested_sections",
        "8-deep nesting, writes at every level, every leave flushes",
        lazy_mmu::nested_sections,
    ),
    test(
        "invalid_request",
        "a rejected request mid-batch is reported, the rest applied",
        lazy_mmu::invalid_request,
    ),
    test(
        "api_misuse",
        "set_ptes contract and unbalanced leave are refused, nothing lost",
        lazy_mmu::api_misuse,
    ),
    test(
        "ptep_get_any_frame",
        "ptep_get reads any frame of the domain; other frames are an error, not a #PF",
        frames::ptep_get_any_frame,
    ),
    test(
        "set_ptes_bad_frame",
        "set_ptes with a machine frame that is not the domain's is refused, not a #PF",
        frames::set_ptes_bad_frame,
    ),
    test(
        "stress",
        "seeded random lazy-MMU programs checked against a shadow (seed= ops= depth=)",
        stress::stress,
    ),
    TestCase {
        name: "bug_privileged_instruction",
        about: "invlpg in a ring-3 PV kernel raises #GP and is reported",
        run: basics::bug_privileged_instruction,
        crashes: true,
    },
    TestCase {
        name: "bug_unbalanced_leave",
        about: "an unbalanced leave through the kernel API is a BUG",
        run: lazy_mmu::bug_unbalanced_leave,
        crashes: true,
    },
];
