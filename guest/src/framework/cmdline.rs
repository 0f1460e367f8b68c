//! The guest command line (`start_info.cmd_line`): whitespace-separated words.
//!
//! | word | meaning |
//! | --- | --- |
//! | `list` | list the in-guest tests and stop |
//! | `tests=a,b` | run only these tests, in this order |
//! | `lazy=nested` / `lazy=strict` / `lazy=was-lazy-flag` | lazy-MMU model: current Linux (default); the 6.6-rc one where a nested enter is a `BUG`; or Linux 2023-2025's per-CPU counter with a per-task "was lazy" flag, where a task switched out at depth >= 2 is a `BUG` |
//! | `irq=immediate` / `irq=batch` | interrupt handlers' page-table writes: at once (Linux, default), or joining the interrupted code's batch (the old bug) |
//! | `preempt` | shorthand for `tests=preempt` |
//! | `tasks=T` `hz=H` | parameters of the preempt test: tasks 1 to 8 (default 3), tick rate 1 to 20000 Hz (default 1000) |
//! | `stress` | shorthand for `tests=stress` |
//! | `seed=N` `ops=M` `depth=D` | parameters of the stress test: seed 0 to 2^64 - 1 (default 1), ops 1 to 50000 (default 500), depth 1 to 64 (default 8) |
//! | `bench` | run the benchmark instead of the tests |
//! | `reps=N` | benchmark repetitions per point: 1 to 1000 (default 5) |
//!
//! Numbers are decimal digits or `0x` followed by hex digits (no sign). Each option may appear
//! once; `list`, `bench` and `tests=`/`stress` choose what runs, so at most one of them may be
//! given. The line must be shorter than [`MAX_LEN`] bytes (1023): Xen copies at most that many
//! into `start_info.cmd_line` (1024 bytes with the NUL) and cuts a longer one silently, so a line
//! of exactly that length may have been truncated and is refused. It must be UTF-8.

use alloc::vec::Vec;
use core::fmt;
use core::num::IntErrorKind;

/// Most operations a stress program may have: the program lives on the kernel's 4 MiB heap.
pub const MAX_STRESS_OPS: u32 = 50_000;
/// Most nesting depth of a stress program.
pub const MAX_STRESS_DEPTH: u32 = 64;
/// Most tasks of the preempt test.
pub const MAX_TASKS: u32 = 8;
/// Highest tick rate (Hz).
pub const MAX_HZ: u32 = 20_000;
/// Most benchmark repetitions per point.
pub const MAX_REPS: u32 = 1000;
/// Size of `start_info.cmd_line` (Xen's `MAX_GUEST_CMDLINE`), the NUL included.
pub const CMD_LINE_SIZE: usize = 1024;
/// Longest line Xen passes: a line this long may have been cut there, so it is refused.
pub const MAX_LEN: usize = CMD_LINE_SIZE - 1;

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options<'a> {
    pub list: bool,
    /// `None`: every test.
    pub tests: Option<Vec<&'a str>>,
    pub strict_lazy: bool,
    /// `lazy=was-lazy-flag`: the 2023-2025 switch rule.
    pub was_lazy_flag: bool,
    /// `irq=batch`: handlers' writes join the interrupted batch.
    pub irq_batch: bool,
    pub tasks: u32,
    pub hz: u32,
    pub seed: u64,
    pub ops: u32,
    pub depth: u32,
    pub bench: bool,
    pub reps: u32,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            list: false,
            tests: None,
            strict_lazy: false,
            was_lazy_flag: false,
            irq_batch: false,
            tasks: 3,
            hz: 1000,
            seed: 1,
            ops: 500,
            depth: 8,
            bench: false,
            reps: 5,
        }
    }
}

/// Why the command line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    UnknownOption(&'a str),
    BadValue {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
    /// The number does not fit in 64 bits.
    Beyond64Bits {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
    /// An option given twice (`first` and `second` are the two words).
    Repeated {
        first: &'a str,
        second: &'a str,
    },
    /// Two options that choose different things to run.
    Clash {
        first: &'a str,
        second: &'a str,
    },
    /// `len` bytes (without the NUL): Xen may have cut the line.
    TooLong {
        len: usize,
    },
    /// Not UTF-8: the first `valid_up_to` bytes are.
    NotUtf8 {
        valid_up_to: usize,
        len: usize,
    },
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::UnknownOption(word) => write!(
                f,
                "unknown option '{word}' (known: list, tests=a,b, lazy=nested|strict|was-lazy-flag, irq=immediate|batch, stress, preempt, seed=N, ops=N, depth=N, tasks=N, hz=N, bench, reps=N)"
            ),
            CmdlineError::BadValue {
                key,
                value,
                expected,
            } => {
                write!(f, "bad value '{value}' for '{key}': expected {expected}")
            }
            CmdlineError::Beyond64Bits {
                key,
                value,
                expected,
            } => write!(
                f,
                "value '{value}' for '{key}' exceeds the 64-bit range: expected {expected}"
            ),
            CmdlineError::Repeated { first, second } => write!(
                f,
                "option given twice: '{first}' and '{second}' (give each option once)"
            ),
            CmdlineError::Clash { first, second } => write!(
                f,
                "'{first}' and '{second}' clash: each chooses what runs (give one of list, bench, tests=/stress/preempt)"
            ),
            CmdlineError::TooLong { len } => write!(
                f,
                "command line is {len} bytes, the most Xen passes ({MAX_LEN} bytes and the NUL in start_info.cmd_line): it may have been truncated; keep it under {MAX_LEN} bytes"
            ),
            CmdlineError::NotUtf8 { valid_up_to, len } => write!(
                f,
                "command line is not UTF-8 (invalid bytes at offset {valid_up_to} of {len})"
            ),
        }
    }
}

fn number<'a, T: TryFrom<u64>>(
    key: &'a str,
    value: &'a str,
    expected: &'static str,
    ok: impl Fn(&T) -> bool,
) -> Result<T, CmdlineError<'a>> {
    let bad = CmdlineError::BadValue {
        key,
        value,
        expected,
    };
    let (digits, radix) = match value.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None => (value, 10),
    };
    // `from_str_radix` also takes a sign: only digits are numbers here.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad);
    }
    let parsed = match u64::from_str_radix(digits, radix) {
        Ok(v) => v,
        Err(e) if *e.kind() == IntErrorKind::PosOverflow => {
            return Err(CmdlineError::Beyond64Bits {
                key,
                value,
                expected,
            });
        }
        Err(_) => return Err(bad),
    };
    match T::try_from(parsed) {
        Ok(v) if ok(&v) => Ok(v),
        _ => Err(bad),
    }
}

/// Parse the command line as Xen hands it over (the bytes before the NUL): refuse a line that
/// may have been truncated or is not UTF-8, then [`parse`] it.
pub fn parse_bytes(line: &[u8]) -> Result<Options<'_>, CmdlineError<'_>> {
    if line.len() >= MAX_LEN {
        return Err(CmdlineError::TooLong { len: line.len() });
    }
    let text = core::str::from_utf8(line).map_err(|e| CmdlineError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
        len: line.len(),
    })?;
    parse(text)
}

/// What an option word sets: a repeat of the same kind is an error, and so are two different
/// ones of the kinds that choose what runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    List,
    Tests,
    Stress,
    Preempt,
    Bench,
    Lazy,
    Irq,
    Tasks,
    Hz,
    Seed,
    Ops,
    Depth,
    Reps,
}

impl Kind {
    fn chooses_what_runs(self) -> bool {
        matches!(
            self,
            Kind::List | Kind::Tests | Kind::Stress | Kind::Preempt | Kind::Bench
        )
    }
}

/// Parse the command line. The first word that is not understood, repeats an option or clashes
/// with an earlier one is the error.
pub fn parse(cmdline: &str) -> Result<Options<'_>, CmdlineError<'_>> {
    let mut o = Options::default();
    let mut seen: Vec<(Kind, &str)> = Vec::new();
    for word in cmdline.split_ascii_whitespace() {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let kind = match (key, value) {
            ("list", None) => Kind::List,
            ("tests", Some(_)) => Kind::Tests,
            ("stress", None) => Kind::Stress,
            ("preempt", None) => Kind::Preempt,
            ("bench", None) => Kind::Bench,
            ("lazy", Some(_)) => Kind::Lazy,
            ("irq", Some(_)) => Kind::Irq,
            ("tasks", Some(_)) => Kind::Tasks,
            ("hz", Some(_)) => Kind::Hz,
            ("seed", Some(_)) => Kind::Seed,
            ("ops", Some(_)) => Kind::Ops,
            ("depth", Some(_)) => Kind::Depth,
            ("reps", Some(_)) => Kind::Reps,
            _ => return Err(CmdlineError::UnknownOption(word)),
        };
        for &(earlier, first) in &seen {
            if earlier == kind {
                return Err(CmdlineError::Repeated {
                    first,
                    second: word,
                });
            }
            if earlier.chooses_what_runs() && kind.chooses_what_runs() {
                return Err(CmdlineError::Clash {
                    first,
                    second: word,
                });
            }
        }
        seen.push((kind, word));
        match (key, value) {
            ("list", None) => o.list = true,
            ("stress", None) => o.tests = Some(alloc::vec!["stress"]),
            ("preempt", None) => o.tests = Some(alloc::vec!["preempt"]),
            ("bench", None) => o.bench = true,
            ("tests", Some(v)) => {
                let names: Vec<&str> = v.split(',').collect();
                if names.iter().any(|n| n.is_empty()) {
                    return Err(CmdlineError::BadValue {
                        key,
                        value: v,
                        expected: "a comma-separated list of test names",
                    });
                }
                o.tests = Some(names);
            }
            ("lazy", Some("strict")) => o.strict_lazy = true,
            ("lazy", Some("nested")) => o.strict_lazy = false,
            ("lazy", Some("was-lazy-flag")) => o.was_lazy_flag = true,
            ("lazy", Some(v)) => {
                return Err(CmdlineError::BadValue {
                    key,
                    value: v,
                    expected: "nested, strict or was-lazy-flag",
                });
            }
            ("irq", Some("immediate")) => o.irq_batch = false,
            ("irq", Some("batch")) => o.irq_batch = true,
            ("irq", Some(v)) => {
                return Err(CmdlineError::BadValue {
                    key,
                    value: v,
                    expected: "immediate or batch",
                });
            }
            ("tasks", Some(v)) => {
                o.tasks = number(key, v, "an integer from 1 to 8", |n: &u32| {
                    (1..=MAX_TASKS).contains(n)
                })?
            }
            ("hz", Some(v)) => {
                o.hz = number(key, v, "an integer from 1 to 20000", |n: &u32| {
                    (1..=MAX_HZ).contains(n)
                })?
            }
            ("seed", Some(v)) => {
                o.seed = number(
                    key,
                    v,
                    "an integer from 0 to 18446744073709551615 (2^64 - 1)",
                    |_: &u64| true,
                )?
            }
            ("ops", Some(v)) => {
                o.ops = number(key, v, "an integer from 1 to 50000", |n: &u32| {
                    (1..=MAX_STRESS_OPS).contains(n)
                })?
            }
            ("depth", Some(v)) => {
                o.depth = number(key, v, "an integer from 1 to 64", |n: &u32| {
                    (1..=MAX_STRESS_DEPTH).contains(n)
                })?
            }
            ("reps", Some(v)) => {
                o.reps = number(key, v, "an integer from 1 to 1000", |n: &u32| {
                    (1..=MAX_REPS).contains(n)
                })?
            }
            _ => unreachable!("every word was classified above"),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_command_line_gives_defaults() {
        assert_eq!(parse("").unwrap(), Options::default());
        assert_eq!(parse("   ").unwrap(), Options::default());
    }

    #[test]
    fn tests_list_and_lazy_mode() {
        let o = parse("tests=console,heap lazy=strict").unwrap();
        assert_eq!(o.tests, Some(vec!["console", "heap"]));
        assert!(o.strict_lazy);
        assert!(parse("list").unwrap().list);
    }

    #[test]
    fn stress_shorthand_and_numbers() {
        let o = parse("stress seed=0x10 ops=50 depth=3").unwrap();
        assert_eq!(o.tests, Some(vec!["stress"]));
        assert_eq!((o.seed, o.ops, o.depth), (16, 50, 3));
    }

    #[test]
    fn unknown_words_and_bad_values_are_named() {
        assert_eq!(
            parse("tests=a frobnicate").unwrap_err(),
            CmdlineError::UnknownOption("frobnicate")
        );
        assert_eq!(
            parse("list=yes").unwrap_err(),
            CmdlineError::UnknownOption("list=yes")
        );
        assert!(parse("ops=50000").is_ok());
        let e = parse("ops=50001").unwrap_err();
        assert!(e.to_string().contains("1 to 50000"), "{e}");
        let e = parse("depth=0").unwrap_err();
        assert!(
            e.to_string().contains("'0'") && e.to_string().contains("depth"),
            "{e}"
        );
        let e = parse("lazy=sloppy").unwrap_err();
        assert!(e.to_string().contains("sloppy"), "{e}");
        assert!(parse("tests=a,,b").is_err());
        assert!(parse("seed=xyz").is_err());
    }

    #[test]
    fn repeated_options_are_errors_naming_both() {
        let e = parse("seed=1 ops=5 seed=2").unwrap_err();
        assert_eq!(
            e,
            CmdlineError::Repeated {
                first: "seed=1",
                second: "seed=2"
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("'seed=1'") && msg.contains("'seed=2'"),
            "{msg}"
        );
        for line in [
            "list list",
            "stress stress",
            "bench bench",
            "tests=a tests=b",
            "lazy=strict lazy=nested",
            "ops=1 ops=1",
            "depth=2 depth=3",
            "reps=1 reps=2",
        ] {
            assert!(
                matches!(parse(line), Err(CmdlineError::Repeated { .. })),
                "{line}: {:?}",
                parse(line)
            );
        }
    }

    #[test]
    fn clashing_options_are_errors_naming_both() {
        let e = parse("stress tests=heap").unwrap_err();
        assert_eq!(
            e,
            CmdlineError::Clash {
                first: "stress",
                second: "tests=heap"
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("'stress'") && msg.contains("'tests=heap'"),
            "{msg}"
        );
        let msg = parse("list bench").unwrap_err().to_string();
        assert!(msg.contains("'list'") && msg.contains("'bench'"), "{msg}");
        for line in [
            "tests=heap stress",
            "bench tests=a",
            "list stress",
            "bench list",
        ] {
            assert!(
                matches!(parse(line), Err(CmdlineError::Clash { .. })),
                "{line}: {:?}",
                parse(line)
            );
        }
        // Parameters of what runs are no clash.
        assert!(parse("stress seed=3 ops=10 depth=2 lazy=strict").is_ok());
        assert!(parse("bench reps=3").is_ok());
        assert!(parse("tests=stress,heap seed=9").is_ok());
    }

    #[test]
    fn preempt_options_and_historical_models() {
        let o = parse("preempt seed=3 tasks=4 hz=2000 ops=100 depth=4").unwrap();
        assert_eq!(o.tests, Some(vec!["preempt"]));
        assert_eq!(
            (o.seed, o.tasks, o.hz, o.ops, o.depth),
            (3, 4, 2000, 100, 4)
        );
        let d = Options::default();
        assert_eq!(
            (d.tasks, d.hz, d.was_lazy_flag, d.irq_batch),
            (3, 1000, false, false)
        );
        assert!(parse("lazy=was-lazy-flag").unwrap().was_lazy_flag);
        assert!(parse("irq=batch").unwrap().irq_batch);
        assert!(!parse("irq=immediate").unwrap().irq_batch);
        for (line, needle) in [
            ("tasks=0", "1 to 8"),
            ("tasks=9", "1 to 8"),
            ("hz=0", "1 to 20000"),
            ("hz=20001", "1 to 20000"),
            ("irq=later", "immediate or batch"),
            ("lazy=flag", "was-lazy-flag"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(matches!(e, CmdlineError::BadValue { .. }), "{line}: {e:?}");
            assert!(e.to_string().contains(needle), "{line}: {e}");
        }
        assert!(parse("tasks=1 hz=20000").is_ok());
        assert!(matches!(
            parse("preempt stress"),
            Err(CmdlineError::Clash { .. })
        ));
        assert!(matches!(
            parse("preempt tests=timer"),
            Err(CmdlineError::Clash { .. })
        ));
        assert!(matches!(
            parse("hz=5 hz=6"),
            Err(CmdlineError::Repeated { .. })
        ));
        assert!(matches!(
            parse("irq=batch irq=batch"),
            Err(CmdlineError::Repeated { .. })
        ));
    }

    #[test]
    fn numbers_beyond_64_bits_say_so() {
        assert_eq!(parse("seed=18446744073709551615").unwrap().seed, u64::MAX);
        assert_eq!(parse("seed=0xffffffffffffffff").unwrap().seed, u64::MAX);
        for line in ["seed=18446744073709551616", "seed=0x10000000000000000"] {
            let e = parse(line).unwrap_err();
            assert!(matches!(e, CmdlineError::Beyond64Bits { .. }), "{e:?}");
            assert!(e.to_string().contains("exceeds the 64-bit range"), "{e}");
        }
        let e = parse("ops=99999999999999999999999").unwrap_err();
        assert!(e.to_string().contains("64-bit range"), "{e}");
        // Digits only: no sign, no empty hex.
        for line in [
            "seed=+5",
            "seed=-1",
            "seed=0x",
            "seed=",
            "ops=0x+5",
            "seed=1_000",
        ] {
            assert!(
                matches!(parse(line), Err(CmdlineError::BadValue { .. })),
                "{line}: {:?}",
                parse(line)
            );
        }
    }

    #[test]
    fn documented_ranges_hold_at_their_edges() {
        assert_eq!(parse("ops=1 depth=1 reps=1 seed=0").unwrap().ops, 1);
        let o = parse("ops=50000 depth=64 reps=1000").unwrap();
        assert_eq!((o.ops, o.depth, o.reps), (50000, 64, 1000));
        for line in ["ops=0", "ops=50001", "depth=65", "reps=0", "reps=1001"] {
            assert!(parse(line).is_err(), "{line}");
        }
        assert_eq!(parse("depth=0x40").unwrap().depth, 64);
    }

    #[test]
    fn a_line_of_xens_maximum_length_may_be_truncated() {
        // 1022 bytes: the longest line Xen surely passed whole.
        let ok = format!("list{}", " ".repeat(MAX_LEN - 1 - 4));
        assert_eq!(ok.len(), 1022);
        assert!(parse_bytes(ok.as_bytes()).unwrap().list);
        let full = format!("list{}", " ".repeat(MAX_LEN - 4));
        let e = parse_bytes(full.as_bytes()).unwrap_err();
        assert_eq!(e, CmdlineError::TooLong { len: 1023 });
        let msg = e.to_string();
        assert!(msg.contains("1023") && msg.contains("truncated"), "{msg}");
        // A line without its NUL (all 1024 bytes) too.
        let all = vec![b'a'; CMD_LINE_SIZE];
        assert!(matches!(
            parse_bytes(&all),
            Err(CmdlineError::TooLong { len: 1024 })
        ));
        assert!(parse_bytes(b"").is_ok());
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_panic() {
        let e = parse_bytes(b"tests=heap \xff\xfe").unwrap_err();
        assert_eq!(
            e,
            CmdlineError::NotUtf8 {
                valid_up_to: 11,
                len: 13
            }
        );
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        // Valid UTF-8 that is no option is still named.
        assert!(matches!(
            parse_bytes("tests=h\u{e9}ap x\u{e9}".as_bytes()),
            Err(CmdlineError::UnknownOption("x\u{e9}"))
        ));
    }
}
