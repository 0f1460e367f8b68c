//! The in-guest test runner. Output follows XTF: a line per test, then `Test result: …`, which
//! the harness (and Xen's own tooling) reads. The tests and the benchmark are handed in by the
//! caller; the runner knows neither.

use alloc::string::String;
use alloc::vec::Vec;

use super::cmdline::{self, Options};

/// The outcome of the whole run, as XTF names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure,
    Error,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Success => "SUCCESS",
            Verdict::Failure => "FAILURE",
            Verdict::Error => "ERROR",
        }
    }
}

/// Why a test did not pass.
#[derive(Debug)]
pub enum TestFail {
    /// The kernel did something wrong.
    Failed(String),
    /// The test could not be run as asked (e.g. options it cannot honour): not the kernel's
    /// fault, but not a pass either.
    Error(String),
}

pub type TestOutcome = Result<(), TestFail>;

/// What a test gets to see.
pub struct Context<'a> {
    pub options: &'a Options<'a>,
}

/// A registered in-guest test.
pub struct TestCase {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Context) -> TestOutcome,
    /// Ends the domain on purpose (e.g. a BUG): runs only when named in `tests=`.
    pub crashes: bool,
}

/// Fail the test with a formatted reason unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err($crate::framework::runner::TestFail::Failed(alloc::format!($($msg)+)));
        }
    };
}

/// Fail the test unless `left == right`, showing both.
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($msg:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err($crate::framework::runner::TestFail::Failed(alloc::format!(
                "{}: {:?} != {:?}", alloc::format!($($msg)+), l, r
            )));
        }
    }};
}

/// Turn any displayable error into a test failure.
pub fn failed(msg: impl core::fmt::Display) -> TestFail {
    TestFail::Failed(alloc::format!("{msg}"))
}

/// Parse the command line (its bytes as Xen passed them), run what it selects from `registry`
/// (or `bench`), and return the overall verdict.
pub fn run_from_cmdline(
    line: &[u8],
    registry: &[TestCase],
    bench: fn(&Options) -> Verdict,
) -> Verdict {
    let options = match cmdline::parse_bytes(line) {
        Ok(o) => o,
        Err(e) => {
            println!("error: command line: {e}");
            return Verdict::Error;
        }
    };
    crate::mm::pte::set_strict(options.strict_lazy);
    crate::mm::pte::set_rules(lazy_mmu::Rules {
        switch: if options.was_lazy_flag {
            lazy_mmu::SwitchRule::WasLazyFlag
        } else {
            lazy_mmu::SwitchRule::PerTask
        },
        irq: if options.irq_batch {
            lazy_mmu::IrqRule::BatchIntoInterrupted
        } else {
            lazy_mmu::IrqRule::Immediate
        },
    });
    if options.list {
        println!("{} tests:", registry.len());
        for t in registry {
            let note = if t.crashes {
                " (crashes on purpose; run by name)"
            } else {
                ""
            };
            println!("  {:<22} {}{note}", t.name, t.about);
        }
        return Verdict::Success;
    }
    if options.bench {
        return bench(&options);
    }
    let selected: Vec<&TestCase> = match &options.tests {
        None => registry.iter().filter(|t| !t.crashes).collect(),
        Some(names) => {
            let mut picked = Vec::new();
            for name in names {
                match registry.iter().find(|t| t.name == *name) {
                    Some(t) => picked.push(t),
                    None => {
                        let known: Vec<&str> = registry.iter().map(|t| t.name).collect();
                        println!(
                            "error: unknown test '{name}' (known tests: {})",
                            known.join(", ")
                        );
                        return Verdict::Error;
                    }
                }
            }
            picked
        }
    };
    let ctx = Context { options: &options };
    let (mut passed, mut failed, mut errors) = (0, 0, 0);
    for t in &selected {
        println!("[ RUN      ] {}", t.name);
        let started = crate::xen::time::now_ns();
        let outcome = (t.run)(&ctx);
        let ms = crate::xen::time::now_ns().saturating_sub(started) / 1_000_000;
        // A test that fails half-way may leave a lazy section open: close it here so the next
        // test starts clean, and count it against the test that left it.
        let outcome = match crate::mm::pte::reset_lazy_state() {
            None => outcome,
            Some(left) => outcome.and(Err(TestFail::Failed(alloc::format!(
                "left lazy mode open ({left}); closed it"
            )))),
        };
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("[       OK ] {} ({ms} ms)", t.name);
            }
            Err(TestFail::Failed(why)) => {
                failed += 1;
                println!("[  FAILED  ] {}: {}", t.name, why);
            }
            Err(TestFail::Error(why)) => {
                errors += 1;
                println!("[  ERROR   ] {}: {}", t.name, why);
            }
        }
    }
    println!("{passed} passed, {failed} failed, {errors} errors");
    if failed > 0 {
        Verdict::Failure
    } else if errors > 0 {
        Verdict::Error
    } else {
        Verdict::Success
    }
}
