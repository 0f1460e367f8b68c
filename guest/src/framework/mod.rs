//! The test framework: the command line, the runner (tests and the benchmark are handed in),
//! and how the kernel dies (panic and fatal-trap reports). `cmdline` is hardware independent
//! and tested on the host.
#![forbid(unsafe_code)]

pub mod cmdline;
#[cfg(target_os = "none")]
pub mod panic;
#[cfg(target_os = "none")]
#[macro_use]
pub mod runner;
