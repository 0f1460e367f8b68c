"""Build the guest kernel ELF."""

import os
import subprocess
import time

from .common import ROOT, HarnessError, say

TARGET = "x86_64-unknown-none"
GUEST_ELF = ROOT / "target" / TARGET / "release" / "guest"
# What boots: the ELF without its debug sections (a seventh of the size: less for Xen to load and
# for a restored dom0 to read, check and unpack). target/.../guest keeps them for addr2line.
BOOT_ELF = GUEST_ELF.with_name("guest.boot")


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
    return boot_elf()


def boot_elf():
    """The guest without debug sections (made again when the build is newer); the full ELF if
    objcopy is missing or fails."""
    fresh = (BOOT_ELF.exists()
             and BOOT_ELF.stat().st_mtime_ns >= GUEST_ELF.stat().st_mtime_ns)
    if fresh:
        return BOOT_ELF
    tmp = BOOT_ELF.with_name(f"guest.boot.{os.getpid()}")
    try:
        r = subprocess.run(["objcopy", "--strip-debug", str(GUEST_ELF), str(tmp)],
                           capture_output=True)
    except FileNotFoundError:
        return GUEST_ELF
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        return GUEST_ELF
    os.replace(tmp, BOOT_ELF)
    return BOOT_ELF
