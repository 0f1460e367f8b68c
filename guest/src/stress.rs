//! Seeded random programs of lazy-MMU operations, shared by host property tests and the in-guest stress test.
