"""Build the guest kernel ELF."""

import subprocess
import time

from .common import ROOT, HarnessError, say

TARGET = "x86_64-unknown-none"
GUEST_ELF = ROOT / "target" / TARGET / "release" / "guest"


def build_guest():
    """cargo build the guest (release); one progress line when it actually built something."""
    cmd = ["cargo", "build", "--release", "-q", "-p", "guest", "--target", TARGET]
    before = GUEST_ELF.stat().st_mtime_ns if GUEST_ELF.exists() else None
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=ROOT)
    except FileNotFoundError:
        raise HarnessError("cargo not found: install Rust with rustup (https://rustup.rs)") from None
    if r.returncode != 0:
        raise HarnessError(f"guest build failed: {' '.join(cmd)}")
    if not GUEST_ELF.exists():
        raise HarnessError(f"the build made no {GUEST_ELF}")
    if GUEST_ELF.stat().st_mtime_ns != before:
        say("build", f"built {GUEST_ELF.relative_to(ROOT)} in {time.monotonic() - t0:.1f} s")
    return GUEST_ELF
