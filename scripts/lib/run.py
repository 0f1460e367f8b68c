"""scripts/run: boot the guest under real Xen in qemu and report its result."""

import os
import sys
import time

from . import machine, provision, toolstack
from .build import build_guest
from .cli import add_boot_options, entry, epilog_text, parser, split_guest_options
from .common import Result, Verdict
from .harness import run_qemu
from .options import check_guest_options

MODES = ["dom0", "domu", "shim", "kvm-xen", "all"]
DESCRIPTION = """\
Boot the guest under real Xen in qemu and report its result: one `== MODE: VERDICT (seconds)` line
per mode. Exits 0 exactly when every mode that ran printed `Test result: SUCCESS`.

modes:
  dom0     qemu (TCG) -> Xen -> the guest as the initial domain (fastest, ~1.5 s; the default)
  domu     qemu -> Xen -> Linux dom0 with xl -> the guest as a PV domU
  shim     the same, the guest under Xen's PV shim (type="pvh", pvshim=1)
  kvm-xen  qemu's own Xen emulation (KVM with KVM_CAP_XEN_HVM, QEMU >= 8.2) running the shim
  all      every mode; kvm-xen is reported as SKIP where the host cannot run it

domu and shim restore a snapshot of the booted dom0 (taken by the first run and cached in .cache/,
rebuilt when qemu, Xen, the dom0 kernel, initramfs or /init change): ~4 s instead of ~15 s.
--cold (or XENPV_COLD=1) boots dom0 from scratch instead.

verdicts: SUCCESS FAILURE ERROR SKIP (the guest's result line); CRASH (it died without one), HANG
(no console output for --silence seconds), TIMEOUT (--timeout ran out), EXITED (qemu ended)."""


def arg_parser():
    ap = parser("scripts/run", DESCRIPTION, epilog_text())
    ap.usage = ("scripts/run [--mode dom0|domu|shim|kvm-xen|all] [--timeout S] [--silence S] "
                "[--memory MIB] [--smp N] [--quiet] [--cold] [-- GUEST OPTIONS...]")
    ap.add_argument("--mode", choices=MODES, default="dom0")
    add_boot_options(ap)
    ap.add_argument("--quiet", action="store_true",
                    help="print only the result lines (not the guest's console)")
    ap.add_argument("--cold", action="store_true",
                    default=os.environ.get("XENPV_COLD") == "1",
                    help="domu/shim: boot Xen and dom0 from scratch instead of restoring the "
                         "dom0 snapshot (also: XENPV_COLD=1)")
    return ap


def main(argv=None):
    argv, guest_opts = split_guest_options(sys.argv[1:] if argv is None else argv)
    ap = arg_parser()
    args = ap.parse_args(argv)
    modes = ["dom0", "domu", "shim", "kvm-xen"] if args.mode == "all" else [args.mode]
    cmdline = check_guest_options(guest_opts, modes)
    echo = not args.quiet
    results = []  # (mode, Result, counts as a failure unless SUCCESS)

    if "kvm-xen" in modes:
        # Probe first: nothing is built or downloaded for a mode this host cannot run.
        usable, why = toolstack.kvm_xen_probe()
        if not usable:
            print(f"kvm-xen: not available on this host: {why}", flush=True)
            modes.remove("kvm-xen")
            # Asked for explicitly, an impossible mode fails; within `all` it is a skip.
            results.append(("kvm-xen", Result(Verdict.SKIP, 0.0), args.mode == "kvm-xen"))

    if modes:
        t0 = time.monotonic()
        paths = provision.ensure_base()
        t1 = time.monotonic()
        guest = build_guest()
        prep = [("provisioning checks", t1 - t0), ("guest build (cargo)", time.monotonic() - t1)]

    if "dom0" in modes:
        r = run_qemu(machine.dom0_guest(paths["xen"], guest, cmdline, args.memory, args.smp),
                     timeout=args.timeout, silence=args.silence, echo=echo)
        results.append(("dom0", r, True))

    kinds = [(m, k) for m, k in (("domu", "pv"), ("shim", "shim")) if m in modes]
    if kinds:
        jobs = [toolstack.Job(m, k, guest, cmdline, memory_mb=args.memory or 0, vcpus=args.smp)
                for m, k in kinds]
        start = time.monotonic()
        job_results = toolstack.run_jobs(jobs, silence=args.silence, timeout=args.timeout,
                                         echo=echo, cold=args.cold)
        print(f"(one toolstack boot for {', '.join(m for m, _ in kinds)}: "
              f"{time.monotonic() - start:.1f} s wall, {toolstack.LAST_RUN.get('how', '?')})")
        if os.environ.get("XENPV_TIMINGS") == "1":
            print_timings(prep + toolstack.timing_breakdown())
        results += [(m, job_results[m], True) for m, _ in kinds]

    if "kvm-xen" in modes:
        r = run_qemu(machine.kvm_xen_guest(paths["shim"], guest, cmdline, args.memory or 512),
                     timeout=args.timeout, silence=args.silence, echo=echo)
        results.append(("kvm-xen", r, True))

    ok = True
    for mode, r, counts in results:
        print(f"== {mode}: {r.verdict} ({r.timing()})")
        if not r.verdict.from_guest and r.tail():
            print(f"-- last console lines of {mode} --\n{r.tail()}")
        if counts and r.verdict != Verdict.SUCCESS:
            ok = False
    return 0 if ok else 1


def process_age():
    """Seconds since this process started (its exec: interpreter start-up and imports
    included), from /proc."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError):
        return None


def print_timings(phases):
    """One `timing:` line per phase (XENPV_TIMINGS=1; scripts/bench --harness reads them)."""
    age = process_age()
    if age is not None:
        print(f"timing: process start until now: {age:.2f} s")
    for label, secs in phases:
        print(f"timing: {label}: {secs:.2f} s")


if __name__ == "__main__":
    entry(main)
