"""Boot Xen in qemu, stream its serial console, and judge the guest's XTF-style result line.

The judge ends qemu as soon as the outcome is known: a `Test result:` line, a crash line from Xen
or the guest, qemu exiting on its own, or the timeout. Nothing waits out a timer once the guest
has spoken.
"""

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from provision import CACHE

RESULT_RE = re.compile(r"Test result: (SUCCESS|FAILURE|ERROR|SKIP)")
# Lines that mean the guest (or Xen under it) is gone and no result line will follow.
CRASH_RES = [
    re.compile(r"Hardware Dom0 crashed"),
    re.compile(r"Hardware Dom0 shutdown"),
    re.compile(r"Hardware Dom0 halted"),  # powered off without a result line
    re.compile(r"Panic on CPU"),
    re.compile(r"Could not construct domain 0|Could not set up DOM0"),
    re.compile(r"domain_crash_sync called"),
    re.compile(r"Unhandled: vec"),
]

# QEMU 7.2 TCG + Xen 4.17. -smap: otherwise a PV kernel (ring 3) that takes an exception dies in
# Xen's create_bounce_frame (an old TCG SMAP emulation bug). family=23,model=1: with TCG's default
# family 15 the PV shim writes an AMD MSR the outer Xen refuses and panics. -monitor: Xen idles
# with MWAIT hints, which #GP on a second CPU.
TCG_CPU = "max,family=23,model=1,-smap,-monitor"


@dataclass
class Outcome:
    verdict: str                 # SUCCESS FAILURE ERROR SKIP CRASH TIMEOUT EXITED
    seconds: float
    lines: list = field(default_factory=list)
    matched: dict = field(default_factory=dict)  # expectation pattern -> first matching line

    def tail(self, n=25):
        return "\n".join(self.lines[-n:])


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


def kvm_works(qemu="qemu-system-x86_64"):
    """Probe once per host (cached): does Xen print its banner under `-accel kvm`?"""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = f"{os.uname().release}"
    stamp = CACHE / "kvm-probe"
    if stamp.exists():
        cached_key, _, verdict = stamp.read_text().partition("=")
        if cached_key == key:
            return verdict == "yes"
    xen = CACHE / "xen" / "xen-4.17-amd64.elf"
    ok = False
    try:
        out = subprocess.run(
            [qemu, "-accel", "kvm", "-cpu", "host", "-m", "256", "-display", "none",
             "-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel", str(xen),
             "-append", "console=com1"],
            capture_output=True, text=True, timeout=6, errors="replace").stdout
        ok = "Xen version" in out
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        ok = "Xen version" in out
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{key}={'yes' if ok else 'no'}")
    return ok


def accel_args(cpu_tcg=TCG_CPU):
    if os.environ.get("XENPV_ACCEL", "auto") != "tcg" and kvm_works():
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", cpu_tcg]


def run_qemu(args, timeout, expect=(), echo=True, prefix="", done_re=RESULT_RE,
             crash_res=CRASH_RES, grace=0.3, on_line=None):
    """Run qemu with `args`, stream its stdout; return an Outcome.

    `expect` is a list of regexes; the first line matching each is recorded in Outcome.matched.
    A line matching `done_re` ends the run (after `grace` seconds for trailing output); so does a
    line matching a crash pattern. `on_line(line)` may return a verdict string to end the run.
    """
    _exit_on_termination_signals()
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    outcome = Outcome(verdict="TIMEOUT", seconds=0.0)
    expect = [re.compile(e) if isinstance(e, str) else e for e in expect]
    buf = b""
    verdict = None
    end_at = None

    def handle(line):
        nonlocal verdict, end_at
        outcome.lines.append(line)
        if echo:
            sys.stdout.write(prefix + line + "\n")
            sys.stdout.flush()
        for e in expect:
            if e.pattern not in outcome.matched and e.search(line):
                outcome.matched[e.pattern] = line
        if verdict is not None:
            return
        m = done_re.search(line) if done_re else None
        if m:
            verdict = m.group(1)
        elif any(c.search(line) for c in crash_res):
            verdict = "CRASH"
        elif on_line:
            verdict = on_line(line)
        if verdict is not None:
            end_at = time.monotonic() + grace

    try:
        while True:
            now = time.monotonic()
            if end_at is not None and now >= end_at:
                break
            if now - start > timeout:
                verdict = verdict or "TIMEOUT"
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
                        verdict = verdict or "EXITED"
                        break
                    continue
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    handle(raw.decode(errors="replace").rstrip("\r"))
            elif proc.poll() is not None:
                verdict = verdict or "EXITED"
                break
        if buf:
            handle(buf.decode(errors="replace").rstrip("\r"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    outcome.verdict = verdict or "TIMEOUT"
    outcome.seconds = time.monotonic() - start
    return outcome


def dom0_args(xen, guest, guest_cmdline="", memory_mb=512, dom0_mem_mb=96, xen_extra=""):
    """qemu arguments that boot `guest` as Xen's PV dom0 with its console on the serial line."""
    # qemu splits -initrd at ',' into multiboot modules; ',,' is a literal comma.
    module = (str(guest) + (" " + guest_cmdline if guest_cmdline else "")).replace(",", ",,")
    xen_cmdline = (f"console=com1 com1=115200,8n1 dom0_mem={dom0_mem_mb}M,max:{dom0_mem_mb}M "
                   f"dom0_max_vcpus=1 loglvl=all guest_loglvl=all {xen_extra}").strip()
    return (["qemu-system-x86_64", *accel_args(), "-m", str(memory_mb), "-smp", "1",
             "-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio",
             "-kernel", str(xen), "-append", xen_cmdline, "-initrd", module])


def kvm_xen_args(shim, guest, guest_cmdline="", memory_mb=512):
    """qemu arguments for qemu's own Xen emulation (KVM_CAP_XEN_HVM, QEMU >= 8.2): the PV shim is
    the kernel, the guest its module, the console a Xen console device (the shim has no serial).
    Only usable where `toolstack.kvm_xen_probe()` says so."""
    return ["qemu-system-x86_64", "-accel", "kvm,xen-version=0x40011,kernel-irqchip=split",
            "-cpu", "host", "-m", str(memory_mb), "-display", "none", "-nodefaults",
            "-no-reboot", "-chardev", "stdio,id=c0", "-device", "xen-console,chardev=c0",
            "-kernel", str(shim), "-initrd", str(guest),
            "-append", f"pv-shim console=xen,pv -- {guest_cmdline}".strip()]
