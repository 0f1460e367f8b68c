"""Build the guest kernel ELF."""

import subprocess
import sys

from provision import ROOT

TARGET = "x86_64-unknown-none"
GUEST_ELF = ROOT / "target" / TARGET / "release" / "guest"


def build_guest(quiet=False):
    cmd = ["cargo", "build", "--release", "-p", "guest", "--target", TARGET]
    if quiet:
        cmd.append("-q")
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"guest build failed: {' '.join(cmd)}")
    return GUEST_ELF
