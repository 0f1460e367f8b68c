//! The guest command line (`start_info.cmd_line`): whitespace-separated words.
//!
//! | word | meaning |
//! | --- | --- |
//! | `list` | list the in-guest tests and stop |
//! | `tests=a,b` | run only these tests, in this order |
//! | `lazy=nested` / `lazy=strict` | lazy-MMU nesting model: current Linux (default), or the 6.6-rc one where a nested enter is a `BUG` |
//! | `stress` | shorthand for `tests=stress` |
//! | `seed=N` `ops=M` `depth=D` | parameters of the stress test |
//! | `bench` | run the benchmark instead of the tests |
//! | `reps=N` | benchmark repetitions per point |

use alloc::vec::Vec;
use core::fmt;

/// Most operations a stress program may have: the program lives on the kernel's 4 MiB heap.
pub const MAX_STRESS_OPS: u32 = 50_000;

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options<'a> {
    pub list: bool,
    /// `None`: every test.
    pub tests: Option<Vec<&'a str>>,
    pub strict_lazy: bool,
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
            seed: 1,
            ops: 2000,
            depth: 8,
            bench: false,
            reps: 5,
        }
    }
}

/// A word of the command line that could not be understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    UnknownOption(&'a str),
    BadValue {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::UnknownOption(word) => write!(
                f,
                "unknown option '{word}' (known: list, tests=a,b, lazy=nested|strict, stress, seed=N, ops=N, depth=N, bench, reps=N)"
            ),
            CmdlineError::BadValue {
                key,
                value,
                expected,
            } => {
                write!(f, "bad value '{value}' for '{key}': expected {expected}")
            }
        }
    }
}

fn number<'a, T: TryFrom<u64>>(
    key: &'a str,
    value: &'a str,
    expected: &'static str,
    ok: impl Fn(&T) -> bool,
) -> Result<T, CmdlineError<'a>> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse::<u64>().ok(),
    };
    match parsed.and_then(|v| T::try_from(v).ok()) {
        Some(v) if ok(&v) => Ok(v),
        _ => Err(CmdlineError::BadValue {
            key,
            value,
            expected,
        }),
    }
}

/// Parse the command line. The first word that is not understood is the error.
pub fn parse(cmdline: &str) -> Result<Options<'_>, CmdlineError<'_>> {
    let mut o = Options::default();
    for word in cmdline.split_ascii_whitespace() {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        match (key, value) {
            ("list", None) => o.list = true,
            ("stress", None) => o.tests = Some(alloc::vec!["stress"]),
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
            ("lazy", Some(v)) => {
                return Err(CmdlineError::BadValue {
                    key,
                    value: v,
                    expected: "nested or strict",
                });
            }
            ("seed", Some(v)) => o.seed = number(key, v, "an integer", |_: &u64| true)?,
            ("ops", Some(v)) => {
                o.ops = number(key, v, "an integer from 1 to 50000", |n: &u32| {
                    (1..=MAX_STRESS_OPS).contains(n)
                })?
            }
            ("depth", Some(v)) => {
                o.depth = number(key, v, "an integer from 1 to 64", |n: &u32| {
                    (1..=64).contains(n)
                })?
            }
            ("reps", Some(v)) => {
                o.reps = number(key, v, "an integer from 1 to 1000", |n: &u32| {
                    (1..=1000).contains(n)
                })?
            }
            _ => return Err(CmdlineError::UnknownOption(word)),
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
}
