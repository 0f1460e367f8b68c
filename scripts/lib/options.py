"""Checks of what the user hands the commands: guest options, timeouts, counts, sizes."""

import argparse
import math

from .common import UsageError

# Xen keeps a guest's command line in start_info.cmd_line[1024] and cuts it at 1023 bytes without
# a word (dom0: the multiboot module string; domU: xl's `extra`; under the shim, libxc asserts on
# a module command line of 1024 bytes or more and xl aborts). A line of exactly 1023 bytes cannot
# be told from a cut one, so the guest reports it as an error: options must stay below that.
XEN_CMDLINE_MAX = 1023
# With qemu's own Xen emulation the options share the shim's command line (Xen's own, also 1023
# bytes) with this prefix.
KVM_XEN_PREFIX = "pv-shim console=xen,pv -- "
LIMITS = {
    "dom0": XEN_CMDLINE_MAX - 1,
    "domu": XEN_CMDLINE_MAX - 1,
    "shim": XEN_CMDLINE_MAX - 1,
    "kvm-xen": XEN_CMDLINE_MAX - 1 - len(KVM_XEN_PREFIX),
}

GUEST_OPTIONS_HELP = """\
guest options (after --, the guest's command line):
  list                          list the in-guest tests
  tests=a,b                     run only these tests (an unknown name is an ERROR naming it)
  lazy=strict                   the pre-fix model: a nested enter is `BUG: nested lazy MMU enter`
  stress seed=N ops=M depth=D   seeded random lazy-MMU programs checked against a shadow
  bench reps=N                  run the benchmark instead of the tests
  Limits: at most {limit} bytes in dom0, domu and shim mode ({kvm} for kvm-xen); no control
  characters (newlines, tabs); quotes and backslashes reach the guest unchanged in every mode."""


def guest_options_help():
    return GUEST_OPTIONS_HELP.format(limit=LIMITS["dom0"], kvm=LIMITS["kvm-xen"])


def check_guest_options(words, modes):
    """The guest command line for the words after `--`, or a UsageError saying why it cannot be
    handed to the guest unchanged in each of `modes`."""
    text = " ".join(words)
    bad = sorted({c for c in text if ord(c) < 0x20 or ord(c) == 0x7f})
    if bad:
        names = ", ".join(repr(c) for c in bad)
        raise UsageError(f"guest options may not contain control characters ({names}): Xen and "
                         "xl cannot hand them to the guest unchanged")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError("guest options are not valid UTF-8") from None
    for mode in modes:
        limit = LIMITS[mode]
        if size > limit:
            raise UsageError(f"guest options are {size} bytes; {mode} mode allows at most {limit} "
                             f"(Xen cuts a guest's command line at {XEN_CMDLINE_MAX} bytes)")
    return text


def _number(kind, text, what):
    try:
        v = kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}") from None
    return v


def positive_seconds(text):
    """argparse type: a positive, finite number of seconds."""
    v = _number(float, text, "seconds")
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number of seconds, not {text!r}")
    return v


def positive_int(text):
    """argparse type: an integer >= 1."""
    v = _number(int, text, "count")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return v


def bounded_int(lo, hi, unit=""):
    def check(text):
        v = _number(int, text, "value")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}{unit}, not {text!r}")
        return v
    check.__name__ = "integer"
    return check
