"""scripts/run: boot the guest under real Xen in qemu and report its result."""

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

verdicts: SUCCESS FAILURE ERROR SKIP (the guest's result line); CRASH (it died without one), HANG
(no console output for --silence seconds), TIMEOUT (--timeout ran out), EXITED (qemu ended)."""


def arg_parser():
    ap = parser("scripts/run", DESCRIPTION, epilog_text())
    ap.usage = ("scripts/run [--mode dom0|domu|shim|kvm-xen|all] [--timeout S] [--silence S] "
                "[--memory MIB] [--smp N] [--quiet] [-- GUEST OPTIONS...]")
    ap.add_argument("--mode", choices=MODES, default="dom0")
    add_boot_options(ap)
    ap.add_argument("--quiet", action="store_true",
                    help="print only the result lines (not the guest's console)")
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
        paths = provision.ensure_base()
        guest = build_guest()

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
                                         echo=echo)
        print(f"(one toolstack boot for {', '.join(m for m, _ in kinds)}: "
              f"{time.monotonic() - start:.1f} s wall)")
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


if __name__ == "__main__":
    entry(main)
