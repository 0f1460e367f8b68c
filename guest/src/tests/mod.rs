//! The in-guest tests, one file per subject. To add one: write `fn(&Context) -> TestOutcome` in a
//! file here and list it in `TESTS`.

use crate::testing::TestCase;

mod basics;

/// Every in-guest test, in the order a full run takes them.
pub static TESTS: &[TestCase] = &[
    TestCase {
        name: "console",
        about: "console output reaches the backend",
        run: basics::console,
    },
    TestCase {
        name: "start_info",
        about: "start_info facts are consistent with P2M/M2P",
        run: basics::start_info,
    },
    TestCase {
        name: "hypercall_page",
        about: "Xen filled the hypercall page; xen_version answers",
        run: basics::hypercall_page,
    },
    TestCase {
        name: "heap",
        about: "Vec/Box round trip through the allocator",
        run: basics::heap,
    },
    TestCase {
        name: "page_fault",
        about: "a deliberate #PF is caught, reported and recovered from",
        run: basics::page_fault,
    },
];
