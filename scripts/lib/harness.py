"""Run qemu, stream its serial console, and judge the guest's XTF-style result line.

The judge ends qemu as soon as the outcome is known: a `Test result:` line, a crash line from Xen
or the guest, qemu exiting on its own, no console output for the silence limit (HANG), or the
timeout. Nothing waits out a timer once the guest has spoken.
"""

import os
import re
import selectors
import signal
import subprocess
import sys
import time

from .common import HarnessError, Result, Verdict, parse_result_line

# Xen's last word on a dom0 that stopped (halted: powered off): nothing more will come.
MACHINE_STOPPED_RE = re.compile(r"Hardware Dom0 (halted|shutdown|crashed)")
# Lines that mean the guest (or Xen under it) is gone and no result line will follow.
CRASH_RES = [
    MACHINE_STOPPED_RE,
    re.compile(r"Panic on CPU"),
    re.compile(r"Could not construct domain 0|Could not set up DOM0"),
    re.compile(r"domain_crash_sync called"),
    re.compile(r"Unhandled: vec"),
]

DEFAULT_SILENCE = 20.0


def judge_line(line):
    """The verdict a dom0-mode console line decides, or None."""
    v = parse_result_line(line)
    if v is not None:
        return v
    if any(c.search(line) for c in CRASH_RES):
        return Verdict.CRASH
    return None


def _die_with_parent():
    """In the qemu child: get SIGKILL when the harness dies, however it dies."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _exit_on_termination_signals():
    """Turn SIGTERM/SIGHUP into SystemExit so `finally` blocks kill qemu (a cancelled CI job)."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, stop)


def run_qemu(args, timeout, silence=DEFAULT_SILENCE, expect=(), echo=True, prefix="",
             judge=judge_line, grace=0.3, on_start=None, pass_fds=()):
    """Run qemu with `args` and stream its stdout; return a Result.

    `judge(line)` returns a Verdict to end the run (after `grace` seconds for trailing output), or
    (Verdict, seconds of grace); it sees every line, also those after its verdict.
    No output for `silence` seconds (None: no limit) ends it as HANG, `timeout` seconds in all as
    TIMEOUT. `expect` is a list of regexes; the first line matching each is recorded in
    Result.matched. `on_start(proc)` runs right after qemu started (e.g. to start a restored
    machine over QMP); an exception from it ends qemu and propagates. `pass_fds` are inherited
    by qemu.
    """
    _exit_on_termination_signals()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent, pass_fds=pass_fds)
    except OSError as e:
        raise HarnessError(f"cannot start {args[0]}: {e.strerror}") from None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    result = Result(verdict=Verdict.TIMEOUT, seconds=0.0)
    expect = [re.compile(e) if isinstance(e, str) else e for e in expect]
    buf = b""
    verdict = None
    end_at = None
    last_output = start

    def handle(line):
        nonlocal verdict, end_at
        result.lines.append(line)
        if echo:
            sys.stdout.write(prefix + line + "\n")
            sys.stdout.flush()
        for e in expect:
            if e.pattern not in result.matched and e.search(line):
                result.matched[e.pattern] = line
        # The judge sees every line, also those in the grace period after its verdict.
        decided = judge(line)
        if verdict is None and decided is not None:
            verdict, wait = decided if isinstance(decided, tuple) else (decided, grace)
            end_at = time.monotonic() + wait
        elif verdict is not None and MACHINE_STOPPED_RE.search(line):
            end_at = time.monotonic()  # the verdict is known and the machine stopped: no grace

    try:
        if on_start is not None:
            on_start(proc)
        while True:
            now = time.monotonic()
            if end_at is not None and now >= end_at:
                break
            if verdict is None and now - start > timeout:
                verdict = Verdict.TIMEOUT
                break
            if verdict is None and silence is not None and now - last_output > silence:
                verdict = Verdict.HANG
                result.lines.append(f"(no console output for {silence:g} s)")
                break
            wait = min(0.1, (end_at - now) if end_at else 0.1)
            events = sel.select(timeout=max(wait, 0.0))
            if events:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    chunk = b""
                if not chunk:
                    if proc.poll() is not None:
                        verdict = verdict or Verdict.EXITED
                        break
                    continue
                last_output = time.monotonic()
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    handle(raw.decode(errors="replace").rstrip("\r"))
            elif proc.poll() is not None:
                verdict = verdict or Verdict.EXITED
                break
        if buf:
            handle(buf.decode(errors="replace").rstrip("\r"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result.verdict = verdict or Verdict.TIMEOUT
    result.seconds = result.since_qemu_start = time.monotonic() - start
    return result
