"""scripts/test: every check the project has, then the guest booted under real Xen in qemu with
the verdict each case must reach (including the deliberate crashes)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import machine, provision
from .build import TARGET, build_guest
from .cli import epilog_text, parser
from .common import CACHE, ROOT, Verdict
from .harness import run_qemu

V = Verdict


@dataclass
class Case:
    name: str
    cmdline: str
    want: Verdict
    pattern: str            # regex that must appear in the guest's console
    memory: int = None      # dom0: machine memory with no dom0_mem limit; domU: the guest's
    smp: int = 1
    fake: str = ""          # boot a tiny misbehaving kernel (lib/toolstack/fake_guests.py) instead
    silence: float = 20.0


DOM0_CASES = [
    Case("all tests", "", V.SUCCESS, r"\[       OK \] move_ptes"),
    Case("unknown test is an error", "tests=nosuch", V.ERROR, r"unknown test 'nosuch'"),
    Case("unknown option is an error", "frobnicate", V.ERROR, r"unknown option 'frobnicate'"),
    Case("quotes and backslashes reach the guest unchanged", "tests=a\\b\"c'd", V.ERROR,
         re.escape("unknown test 'a\\b\"c'd'")),
    Case("list", "list", V.SUCCESS, r"move_ptes"),
    Case("strict lazy mode: nested enter is a BUG", "tests=move_ptes lazy=strict", V.CRASH,
         r"BUG: nested lazy MMU enter"),
    Case("unbalanced leave is a BUG", "tests=bug_unbalanced_leave", V.CRASH,
         r"BUG: unbalanced lazy MMU leave"),
    Case("stress seed 7, depth 8", "stress seed=7 ops=4000 depth=8", V.SUCCESS,
         r"\[       OK \] stress"),
    Case("stress seed 1234, depth 3", "stress seed=1234 ops=4000 depth=3", V.SUCCESS,
         r"\[       OK \] stress"),
    Case("stress seed 99, depth 16", "stress seed=99 ops=6000 depth=16", V.SUCCESS,
         r"\[       OK \] stress"),
    Case("privileged instruction is reported", "tests=bug_privileged_instruction", V.CRASH,
         r"EXCEPTION 13 \(#GP general protection\) error code 0x0 at rip"),
    Case("preempt seed 1, 3 tasks at 1 kHz", "preempt seed=1 tasks=3 hz=1000", V.SUCCESS,
         r"\[       OK \] preempt"),
    Case("preempt seed 77, 4 tasks at 2 kHz, depth 12", "preempt seed=77 tasks=4 hz=2000 depth=12",
         V.SUCCESS, r"\[       OK \] preempt"),
    Case("preempt seed 4242, 2 tasks at 1 kHz, 4000 ops", "preempt seed=4242 tasks=2 ops=4000",
         V.SUCCESS, r"\[       OK \] preempt"),
    Case("preempt that never ticks inside its programs fails after 4 rounds",
         "preempt hz=1 ops=100", V.FAILURE, r"in 4 rounds, no switch inside a lazy section"),
    Case("a task that panics is reported with its name", "tests=bug_task_panic", V.CRASH,
         r"PANIC in task 'doomed'"),
    Case("lazy=was-lazy-flag: a task preempted at depth >= 2 is a BUG",
         "tests=preempt_nested lazy=was-lazy-flag", V.CRASH,
         r"PANIC in task 'task-a'.*BUG: enter_lazy\(XEN_LAZY_CPU\) at a context switch"),
    Case("lazy=was-lazy-flag: seeded preempted programs hit a BUG",
         "preempt seed=1 lazy=was-lazy-flag", V.CRASH,
         r"PANIC in task 'prog\d'.*BUG: (enter_lazy\(XEN_LAZY_CPU\) at a context switch|"
         r"unbalanced lazy MMU leave)"),
    Case("irq=batch: a handler's fresh mapping is still queued: #PF", "tests=irq_scratch_page irq=batch",
         V.CRASH, r"EXCEPTION 14 \(#PF page fault\)"),
    Case("a silent kernel is a HANG after --silence", "", V.HANG, r"no console output for 3 s",
         fake="hang", silence=3),
]

# Toolstack modes, all in one dom0 boot: (job name, kind, case).
TOOLSTACK_CASES = [
    ("domu", "pv", Case("", "", V.SUCCESS, r"role domU, .*console PV console ring")),
    ("shim", "shim", Case("", "", V.SUCCESS, r"\(XEN\) Command line: pv-shim")),
    ("domu-nosuch", "pv", Case("", "tests=nosuch", V.ERROR, r"unknown test 'nosuch'")),
    ("shim-nosuch", "shim", Case("", "tests=nosuch", V.ERROR, r"unknown test 'nosuch'")),
    ("domu-quotes", "pv", Case("", "tests=a\\b\"c'd", V.ERROR,
                               re.escape("unknown test 'a\\b\"c'd'"))),
    ("shim-quotes", "shim", Case("", "tests=a\\b\"c'd", V.ERROR,
                                 re.escape("unknown test 'a\\b\"c'd'"))),
    ("domu-strict", "pv", Case("", "tests=move_ptes lazy=strict", V.CRASH,
                               r"BUG: nested lazy MMU enter")),
    ("shim-strict", "shim", Case("", "tests=move_ptes lazy=strict", V.CRASH,
                                 r"BUG: nested lazy MMU enter")),
    ("domu-stress", "pv", Case("", "stress seed=31 ops=4000 depth=8", V.SUCCESS,
                               r"\[       OK \] stress")),
    ("shim-stress", "shim", Case("", "stress seed=32 ops=4000 depth=8", V.SUCCESS,
                                 r"\[       OK \] stress")),
    ("domu-preempt", "pv", Case("", "preempt seed=33 tasks=3 hz=1000", V.SUCCESS,
                                r"\[       OK \] preempt")),
    ("shim-preempt", "shim", Case("", "preempt seed=34 tasks=3 hz=1000", V.SUCCESS,
                                  r"\[       OK \] preempt")),
    ("domu-was-lazy-flag", "pv", Case("", "tests=preempt_nested lazy=was-lazy-flag", V.CRASH,
                                      r"BUG: enter_lazy\(XEN_LAZY_CPU\) at a context switch")),
    ("shim-irq-batch", "shim", Case("", "tests=irq_scratch_page irq=batch", V.CRASH,
                                    r"EXCEPTION 14 \(#PF page fault\)")),
    ("domu-hang", "pv", Case("", "", V.HANG, r"no console output for 3 s", fake="hang",
                             silence=3)),
]

# ------------------------------------------------------------------------------------------------
# The guest must boot with whatever memory Xen gives it, and mind no extra vCPUs.
MEMORY_DOM0_CASES = [
    Case("dom0 with 1 GiB, no dom0_mem limit", "", V.SUCCESS, r"\[       OK \] move_ptes",
         memory=1024),
    Case("dom0 with 4 GiB, no dom0_mem limit", "", V.SUCCESS, r"\[       OK \] move_ptes",
         memory=4096),
    Case("dom0 with 2 vCPUs (-smp 2, dom0_max_vcpus=2)", "", V.SUCCESS,
         r"\[       OK \] move_ptes", smp=2),
]
# The 1 GiB domU needs a larger machine than the dom0 snapshot's, so it boots cold: it is the one
# cold-boot case (cold_boot_case), which also keeps the snapshot from hiding a boot regression.
COLD_DOMU_MEMORY_MB = 1024
# ------------------------------------------------------------------------------------------------

# A crash must be reported this soon after the guest starts (it crashes within a second).
CRASH_REPORT_LIMIT_S = 10.0
UNIT_TESTS = ROOT / "scripts" / "lib" / "tests"
# Longest programs the exhaustive checker enumerates (~25 s on 2 cores at 7).
EXHAUSTIVE_LENGTH = 7


def step(title, cmd, cwd=ROOT, capture=False):
    """Run one check; with `capture`, its output is printed in one piece when it ends (for
    checks that run side by side)."""
    t = time.monotonic()
    head = f"\n=== {title}: {' '.join(map(str, cmd))}"
    if not capture:
        print(head, flush=True)
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.STDOUT if capture else None, text=True)
    tail = (f"=== {title}: {'ok' if r.returncode == 0 else 'FAILED'} "
            f"({time.monotonic() - t:.1f} s)")
    with PRINT_LOCK:
        if capture:
            print(head + "\n" + r.stdout, end="" if r.stdout.endswith("\n") or not r.stdout
                  else "\n")
        print(tail, flush=True)
    return r.returncode == 0


PRINT_LOCK = threading.Lock()
UNIT_CMD = [sys.executable, "-m", "unittest", "discover", "-q", "-s", str(UNIT_TESTS), "-t",
            str(ROOT / "scripts")]


def unit_tests(capture=False):
    return step("harness unit tests", UNIT_CMD, cwd=ROOT / "scripts", capture=capture)


def side_by_side(*lanes):
    """Run each lane (a function returning a list of failures) in its own thread; the failures
    of all. The lanes print whole blocks under PRINT_LOCK."""
    results = [None] * len(lanes)

    def run(i, lane):
        try:
            results[i] = lane()
        except Exception as e:  # noqa: BLE001 - reported as a failure of that lane
            results[i] = [f"{lane.__name__}: {type(e).__name__}: {e}"]

    threads = [threading.Thread(target=run, args=(i, lane), daemon=True)
               for i, lane in enumerate(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    return [f for r in results for f in r]


_FAKES = {}
_FAKES_LOCK = threading.Lock()


def _fake(kind):
    """A tiny misbehaving kernel, written once per run (both lanes use them)."""
    from .toolstack import fake_guests
    with _FAKES_LOCK:
        if kind not in _FAKES:
            d = CACHE / "fake-guests"
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{kind}.tmp{os.getpid()}"
            fake_guests.write(kind, tmp)
            _FAKES[kind] = tmp.replace(d / kind)
        return _FAKES[kind]


def _with_failed_tests(lines, tail):
    """The guest's `[  FAILED  ]` lines, then `tail` (which may not reach back to them)."""
    return "\n".join([line for line in lines if "FAILED  ]" in line] + [tail])


def _verdict_line(ok, got, want, seen, pattern):
    return (f"{got}, expected {want}; '{pattern}' {'seen' if seen else 'NOT seen'} -> "
            f"{'ok' if ok else 'FAILED'}")


def boot_cases(xen, guest, cases):
    failures = []
    for c in cases:
        kernel = _fake(c.fake) if c.fake else guest
        extra = "".join([f", {c.memory} MiB" if c.memory else "",
                         f", {c.smp} vCPUs" if c.smp > 1 else ""])
        print(f"\n=== boot (dom0{extra}): {c.name}: guest options \"{c.cmdline}\"", flush=True)
        out = run_qemu(machine.dom0_guest(xen, kernel, c.cmdline, c.memory, c.smp), timeout=60,
                       silence=c.silence, expect=[c.pattern], echo=False)
        seen = any(re.search(c.pattern, line) for line in out.lines)
        ok = out.verdict == c.want and seen
        print(f"=== boot (dom0): {c.name}: in {out.seconds:.1f} s: "
              f"{_verdict_line(ok, out.verdict, c.want, seen, c.pattern)}", flush=True)
        if not ok:
            print(_with_failed_tests(out.lines, out.tail(40)))
            failures.append(c.name)
    return failures


def toolstack_cases(guest, cases):
    """The cases as jobs in one dom0 restored from its snapshot; cases that need a larger machine
    than the snapshot's in a cold-booted one."""
    from . import toolstack
    jobs = [toolstack.Job(name, kind, _fake(c.fake) if c.fake else guest, c.cmdline,
                          memory_mb=c.memory or 0, vcpus=c.smp, silence=c.silence)
            for name, kind, c in cases]
    results = {}
    out = []
    fits = [j for j in jobs if toolstack.snapshot_fits([j])]
    for group in (fits, [j for j in jobs if j not in fits]):
        if not group:
            continue
        t = time.monotonic()
        out.append(f"\n=== boot (toolstack): {len(group)} guests as PV domU / under the PV shim, "
                   f"one dom0")
        results.update(toolstack.run_jobs(group, timeout=60, echo=False))
        out.append(f"=== boot (toolstack): {toolstack.LAST_RUN.get('how', '?')}, "
                   f"{time.monotonic() - t:.1f} s")
    failures = []
    for name, kind, c in cases:
        r = results[name]
        seen = any(re.search(c.pattern, line) for line in r.lines)
        ok = r.verdict == c.want and seen
        if c.want == V.CRASH and r.seconds > CRASH_REPORT_LIMIT_S:
            ok = False
        out.append(f"=== boot ({kind}): {name}: guest options \"{c.cmdline}\": after "
                   f"{r.seconds:.1f} s ({r.since_qemu_start:.1f} s from qemu start): "
                   f"{_verdict_line(ok, r.verdict, c.want, seen, c.pattern)}")
        if not ok:
            out.append(r.tail())
            failures.append(f"{kind}: {name}")
    with PRINT_LOCK:
        print("\n".join(out), flush=True)
    return failures


def cold_boot_case():
    """scripts/run --mode domu --cold with a 1 GiB domU: the one toolstack case that boots Xen and
    dom0 from scratch (so that the snapshot never hides a boot regression), and the memory case
    for a large domU (which needs a larger machine than the snapshot's anyway)."""
    t0 = time.monotonic()
    cmd = [str(ROOT / "scripts" / "run"), "--mode", "domu", "--cold", "--memory",
           str(COLD_DOMU_MEMORY_MB)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    pages = COLD_DOMU_MEMORY_MB * 256
    sized = f"memory {pages} pages ({COLD_DOMU_MEMORY_MB} MiB)" in p.stdout
    ok = (p.returncode == 0 and "== domu: SUCCESS" in p.stdout and "cold boot" in p.stdout
          and sized)
    with PRINT_LOCK:
        print(f"\n=== cold boot: scripts/run {' '.join(cmd[1:])}: exit {p.returncode} after "
              f"{time.monotonic() - t0:.1f} s, the guest {'saw' if sized else 'did NOT see'} "
              f"{pages} pages -> {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            lines = p.stdout.splitlines()
            print(_with_failed_tests(lines, "\n".join(lines[-40:])), flush=True)
    return [] if ok else ["cold boot (domu, 1 GiB)"]


def interrupt_case():
    """Ctrl-C during a boot: exit 130, no traceback, no qemu left behind."""
    tag = f"seed={os.getpid()}"
    print("\n=== interrupt: Ctrl-C during scripts/run (exit 130, no traceback, qemu ended)",
          flush=True)
    # SIGINT back to its default in the child: a shell starts background jobs with it ignored,
    # and Python then never turns it into KeyboardInterrupt (the case would test nothing).
    p = subprocess.Popen([str(ROOT / "scripts" / "run"), "--quiet", "--", "stress", tag,
                          "ops=50000", "depth=8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(3.0)
    os.killpg(p.pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
    time.sleep(0.2)
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and tag.encode() in (proc / "cmdline").read_bytes():
                left.append(proc.name)
        except OSError:
            pass
    ok = p.returncode == 130 and "Traceback" not in err and not left
    print(f"=== interrupt: exit {p.returncode}, {'a' if 'Traceback' in err else 'no'} traceback, "
          f"{'qemu still running: ' + ' '.join(left) if left else 'no qemu left'} -> "
          f"{'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        print(err[-3000:])
    return [] if ok else ["interrupt"]


def main(argv=None):
    ap = parser("scripts/test", """\
Every check the project has: the harness's unit tests, cargo fmt and clippy, the host tests, then
the guest booted under real Xen in qemu as dom0, PV domU and under the PV shim, each case with the
verdict it must reach (including the deliberate crashes).""", epilog_text())
    ap.add_argument("--quick", action="store_true", help="skip the qemu boots")
    ap.add_argument("--unit", action="store_true",
                    help="only the harness's unit tests (a few seconds, no qemu, no cargo)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.unit:
        failed = [] if unit_tests() else ["harness unit tests"]
        print("\n=== summary:", "all passed" if not failed else "FAILED: " + "; ".join(failed))
        return 1 if failed else 0
    provision.ensure_rust_target()
    checks = [
        ("format", ["cargo", "fmt", "--all", "--", "--check"]),
        ("clippy (host)", ["cargo", "clippy", "--workspace", "--all-targets", "-q", "--", "-D",
                           "warnings"]),
        ("clippy (guest target)", ["cargo", "clippy", "-p", "guest", "-p", "hypercalls",
                                   "-p", "lazy-mmu", "--target", TARGET, "-q", "--", "-D",
                                   "warnings"]),
        ("host tests", ["cargo", "test", "--workspace", "-q"]),
    ]
    failed = [title for title, cmd in checks if not step(title, cmd)]
    units = lambda: [] if unit_tests(capture=True) else ["harness unit tests"]  # noqa: E731
    # Every lazy-MMU program up to 7 calls against the strict in-order reference; prints
    # `exhaustive: N programs up to length 7 checked`. Beside the boots, at the lowest priority,
    # instead of ~15 s of its own before them: the qemu lanes keep their share of the two
    # cores, and it takes what they leave.
    exhaustive = lambda: [] if step("exhaustive", [  # noqa: E731
        "nice", "-n", "19", "cargo", "run", "--release", "-q", "-p", "lazy-mmu", "--example",
        "exhaustive", "--", str(EXHAUSTIVE_LENGTH)], capture=True) else ["exhaustive"]
    if args.quick:
        failed += side_by_side(units, exhaustive)
    else:
        from . import toolstack
        from .harness import _exit_on_termination_signals
        paths = provision.ensure_base()
        guest = build_guest()
        toolstack.prepare()
        # Built here, so that its build does not run at the lowest priority.
        if not step("exhaustive (build)", ["cargo", "build", "--release", "-q", "-p",
                                           "lazy-mmu", "--example", "exhaustive"]):
            failed.append("exhaustive (build)")
        _exit_on_termination_signals()  # in the main thread, before the lanes start qemu
        dom0 = DOM0_CASES + MEMORY_DOM0_CASES
        # Two qemu at a time: the dom0-mode boots, the cold toolstack boot and the Ctrl-C case
        # one after another, next to the toolstack cases in one restored dom0; the harness's
        # unit tests (no qemu, mostly waiting on subprocesses) and the exhaustive checker (at
        # the lowest priority) next to both.
        failed += side_by_side(
            lambda: boot_cases(paths["xen"], guest, dom0) + cold_boot_case() + interrupt_case(),
            lambda: toolstack_cases(guest, TOOLSTACK_CASES), units, exhaustive)
    print("\n=== summary:", "all passed" if not failed else "FAILED: " + "; ".join(failed))
    return 1 if failed else 0
