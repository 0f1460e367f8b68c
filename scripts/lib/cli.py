"""What the commands share: the entry wrapper (HarnessError and Ctrl-C without a traceback), the
`--` split, the common options and their help text."""

import argparse
import sys

from .common import HarnessError
from .harness import DEFAULT_SILENCE
from .options import bounded_int, guest_options_help, positive_seconds

ENVIRONMENT_HELP = """\
environment:
  XENPV_ACCEL=tcg   never use KVM (default: KVM only where a probe shows Xen boots under it)
  XENPV_VERBOSE=1   domu/shim: also stream Xen's and dom0's serial lines
  XENPV_CACHE=DIR   download and build cache (default: .cache/ in the checkout)
  XENPV_COLD=1      domu/shim: boot dom0 from scratch, not from the cached dom0 snapshot
  XENPV_TIMINGS=1   scripts/run: print where the time of a domu/shim run went"""


def entry(main):
    """Run `main()` and exit with its code: a HarnessError prints one line (no traceback) and
    exits with its code; Ctrl-C exits 130."""
    prog = sys.argv[0].rsplit("/", 2)
    prog = "/".join(prog[-2:]) if len(prog) > 1 else prog[0]
    try:
        code = main()
    except HarnessError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        code = 130
    sys.exit(code)


def split_guest_options(argv):
    """(harness arguments, guest option words): the guest's options follow the first `--`."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


class Parser(argparse.ArgumentParser):
    """argparse that points a stray word (`scripts/run list`) to `--`."""

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        stray = [a for a in extra if not a.startswith("-")]
        if stray:
            self.error(f"unexpected argument {' '.join(stray)!r}: guest options go after '--', "
                       f"e.g. {self.prog} -- {' '.join(stray)}")
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def parser(prog, description, epilog=""):
    return Parser(prog=prog, description=description, epilog=epilog,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def add_boot_options(ap, timeout=120.0, silence=DEFAULT_SILENCE):
    ap.add_argument("--timeout", type=positive_seconds, default=timeout, metavar="S",
                    help=f"dom0/kvm-xen: seconds for the whole boot; domu/shim: seconds from "
                         f"xl create to the result (TIMEOUT; default {timeout:g})")
    ap.add_argument("--silence", type=positive_seconds, default=silence, metavar="S",
                    help=f"seconds without console output before the guest is reported as HANG "
                         f"with the tail of its console (default {silence:g})")
    ap.add_argument("--memory", type=bounded_int(64, 1 << 20, " MiB"), metavar="MIB",
                    help="dom0: the machine's memory, all of it for the guest (default: 512 MiB "
                         "with dom0_mem=96M); domu/shim: the domain's memory (default 64; the shim keeps ~23 of it)")
    ap.add_argument("--smp", type=bounded_int(1, 64), default=1, metavar="N",
                    help="dom0: qemu -smp N and dom0_max_vcpus=N; domu/shim: the guest's vcpus "
                         "(default 1)")


def epilog_text(extra=""):
    return "\n\n".join(p for p in (extra, guest_options_help(), ENVIRONMENT_HELP) if p)
