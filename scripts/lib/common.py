"""What every part of the harness shares: paths, the verdicts, the result of a boot, the error
type, progress lines and small file helpers."""

import enum
import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# XENPV_CACHE moves the download/build cache (the self-tests use a scratch one).
CACHE = Path(os.environ.get("XENPV_CACHE") or ROOT / ".cache").resolve()


class HarnessError(Exception):
    """Something the user can act on (bad input, missing tool, failed download or build).
    Raised by library code; each command's main() prints it without a traceback."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(HarnessError):
    """Bad command-line input: exit code 2, like argparse."""

    def __init__(self, message):
        super().__init__(message, exit_code=2)


class Verdict(str, enum.Enum):
    """The outcome of one boot. The first four are printed by the guest (`Test result: X`, XTF's
    format); the others are the harness's judgement when no result line came."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    ERROR = "ERROR"
    SKIP = "SKIP"
    CRASH = "CRASH"      # the guest, Xen or dom0 died without a result line
    HANG = "HANG"        # no console output for the silence limit
    TIMEOUT = "TIMEOUT"  # the whole --timeout ran out while the guest still talked
    EXITED = "EXITED"    # qemu ended without a result line or a crash report

    def __str__(self):
        return self.value

    @property
    def from_guest(self):
        return self in GUEST_VERDICTS


GUEST_VERDICTS = (Verdict.SUCCESS, Verdict.FAILURE, Verdict.ERROR, Verdict.SKIP)
RESULT_PREFIX = "Test result: "
RESULT_RE = re.compile(re.escape(RESULT_PREFIX) + "(" + "|".join(v.value for v in GUEST_VERDICTS)
                       + ")")

# Xen's raw stack dumps, cut short in tails: they would crowd out the lines that say what happened.
STACK_DUMP_RE = re.compile(r"^(host: )?\(XEN\)\s+([0-9a-f]{16}\s*)+$")


def parse_result_line(line):
    """The Verdict of a `Test result: X` line, or None."""
    m = RESULT_RE.search(line)
    return Verdict(m.group(1)) if m else None


def tail_lines(lines, n=25):
    out, run = [], 0
    for line in lines:
        if STACK_DUMP_RE.match(line):
            run += 1
            if run == 3:
                out.append("    ... (stack dump cut)")
            if run >= 3:
                continue
        else:
            run = 0
        out.append(line)
    return "\n".join(out[-n:])


@dataclass
class Result:
    """One guest's boot: its verdict, timings and console."""

    verdict: Verdict
    seconds: float                 # from qemu start (dom0) or from `xl create` (domU, shim)
    since_qemu_start: float = 0.0  # wall time from qemu's start to the verdict
    lines: list = field(default_factory=list)    # the guest's console lines
    matched: dict = field(default_factory=dict)  # expectation pattern -> first matching line
    context: str = ""              # e.g. the serial's tail when dom0 died under the guest

    def tail(self, n=25):
        own = tail_lines(self.lines, n)
        return (own + "\n" + self.context if own else self.context) if self.context else own

    def timing(self):
        if abs(self.seconds - self.since_qemu_start) < 0.05:
            return f"{self.seconds:.1f} s"
        return f"{self.seconds:.1f} s from xl create, {self.since_qemu_start:.1f} s from qemu start"


def say(tag, msg):
    """One progress line on stderr (stdout stays for results and the console)."""
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def mib(nbytes):
    return f"{nbytes / (1 << 20):.1f} MiB"


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path, data):
    """Write `data` (bytes or str) to `path` through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
