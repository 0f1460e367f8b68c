"""Run the guest as a domU under Xen's toolstack: qemu → Xen → Linux dom0 (initramfs) → `xl create`.

Two kinds of job share one boot: `pv` (a PV domU) and `shim` (a PVH domain running Xen's PV shim,
which runs the guest as its PV domU). The dom0 is Debian's kernel with a busybox initramfs whose
/init (`init.sh` next to this file) starts xenstored and xenconsoled and then runs the jobs in
order, printing `@@` markers on the serial line that `JobMonitor` turns into results (the markers
are never shown to the user).

The base initramfs (busybox, the xen modules, the toolstack binaries and their libraries) is built
once and cached; each run appends a small uncompressed cpio with the guest ELF(s), their xl configs,
the job list and the verdict names init.sh uses (Linux unpacks concatenated archives in order).

Self-test of the verdicts (tiny kernels that crash, power off silently or hang), from scripts/:
    python3 -m lib.toolstack --selftest [--guest PATH]
"""

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import machine, provision
from ..common import (GUEST_VERDICTS, RESULT_PREFIX, RESULT_RE, HarnessError, Result, Verdict,
                      mib, parse_result_line, say, tail_lines, write_atomic)
from ..cpio import Cpio
from ..elf import elf_needed
from ..harness import DEFAULT_SILENCE, run_qemu
from ..options import LIMITS
from ..qmp import Qmp, QmpError
from . import fake_guests, snapshot

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
WORK = provision.CACHE / "toolstack"

# Bump when the layout of the base initramfs changes in a way its inputs do not show.
BASE_FORMAT = 4

KERNEL_META = "linux-image-amd64"
# What `xl`, xenstored, xenconsoled and xen-init-dom0 link against (found by following DT_NEEDED
# below; this list only says which packages to fetch).
LIB_PACKAGES = [
    "libxenmisc4.17", "libxencall1", "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1",
    "libxenstore4", "libxentoollog1", "libxendevicemodel1", "libxenhypfs1", "libxentoolcore1",
    "libyajl2", "libncurses6", "libtinfo6", "libext2fs2", "libcom-err2", "liblzma5", "libuuid1",
    "libzstd1", "zlib1g", "libc6", "libgcc-s1",
]
XEN_BIN = "usr/lib/xen-4.17/bin"
TOOLS = ["xl", "xenstored", "xenconsoled", "xen-init-dom0", "libxl-save-helper"]
# Loaded with dlopen, so DT_NEEDED does not show it: glibc needs it for pthread_cancel, which
# `xl create` uses (without it: "libgcc_s.so.1 must be installed for pthread_cancel", abort).
DLOPENED = ["libgcc_s.so.1"]
SHIM_PATH = "/usr/lib/xen-4.17/boot/xen-shim"
# Load order matters: xenfs uses privcmd.
MODULES = ["xen-privcmd", "xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc"]
# The payload disk of a restored snapshot (virtio-blk over PCI), in load order.
VIRTIO_MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                  "virtio_pci", "virtio_blk"]
LIB_DIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu",
            "usr/lib/xen-4.17/lib/x86_64-linux-gnu"]

# Memory: dom0 holds the unpacked initramfs (~13 MB) plus Linux; guests come from the rest
# (320 MB measured enough; bootscrub=0 keeps Xen from scrubbing the rest at boot). The machine
# grows with the largest guest.
QEMU_MEM_MB = 1024
DOM0_MEM_MB = 320
GUEST_MEM_MB = 64
# The shim's domain: the shim keeps ~23 MiB, the guest gets ~41 MiB (the full list and
# `stress ops=50000` pass in that). Against 96 MiB, less for the outer and the inner Xen to set
# up: measured 0.2 s off a warm shim run.
SHIM_MEM_MB = 64
MACHINE_OVERHEAD_MB = 384
# Quiet Linux: every console byte costs emulated time, and only /init's lines matter here.
# mitigations=off saves ~0.3 s of boot in this throwaway dom0.
DOM0_CMDLINE = "console=hvc0 quiet loglevel=3 nokaslr mitigations=off"
# Budget for Xen + Linux boot + toolstack start (~6 s measured) in the whole-run timeout.
BOOT_ALLOWANCE = 90.0
# init.sh gives `xl create` up to 60 s without printing anything.
XL_CREATE_ALLOWANCE = 70.0

NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,40}$")


def log(msg):
    say("toolstack", msg)


@dataclass
class Job:
    name: str
    kind: str                    # 'pv' | 'shim'
    guest: Path
    cmdline: str = ""
    memory_mb: int = 0           # 0: GUEST_MEM_MB for pv, SHIM_MEM_MB for shim
    vcpus: int = 1
    silence: float = 0           # 0: run_jobs' silence (seconds without output: HANG)
    timeout: float = 0           # 0: run_jobs' timeout (seconds from xl create: TIMEOUT)

    @property
    def memory(self):
        return self.memory_mb or (SHIM_MEM_MB if self.kind == "shim" else GUEST_MEM_MB)


# ---------------------------------------------------------------------------------------------
# prepare()


def extract_vmlinux(vmlinuz, dest):
    """Unpack the xz stream inside a bzImage: Xen then loads the ELF directly and Linux skips its
    own decompressor, which is slow under TCG."""
    data = Path(vmlinuz).read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise HarnessError(f"{vmlinuz}: no xz stream found")
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError as e:
        raise HarnessError(f"{vmlinuz}: {e}") from None
    if out[:4] != b"\x7fELF":
        raise HarnessError(f"{vmlinuz}: the xz stream is not an ELF")
    Path(dest).write_bytes(out)


def _kernel_tree(kernel_pkg, deb):
    members = ["./boot/vmlinuz-*"] + [f"./lib/modules/*/kernel/drivers/xen/{m}.ko"
                                      for m in ("xen-privcmd", "xen-evtchn", "xen-gntdev",
                                                "xen-gntalloc")]
    members.append("./lib/modules/*/kernel/drivers/xen/xenfs/xenfs.ko")
    members += [f"./lib/modules/*/kernel/drivers/virtio/{m}.ko" for m in VIRTIO_MODULES
                if m != "virtio_blk"]
    members.append("./lib/modules/*/kernel/drivers/block/virtio_blk.ko")
    return provision.extract_from_deb(deb, WORK / "pkgs" / kernel_pkg, members)


def _collect_libs(trees, roots, extra=()):
    """{soname: bytes} for the DT_NEEDED closure of `roots` (list of bytes) and `extra` (sonames),
    searched in `trees`."""
    try:
        found, todo = {}, [n for r in roots for n in elf_needed(r)] + list(extra)
        while todo:
            name = todo.pop()
            if name in found:
                continue
            for t in trees:
                hit = next((t / d / name for d in LIB_DIRS if (t / d / name).exists()), None)
                if hit:
                    break
            else:
                raise HarnessError(f"no package in the toolstack list provides {name}")
            data = hit.resolve().read_bytes()
            found[name] = data
            todo.extend(elf_needed(data))
    except ValueError as e:
        raise HarnessError(f"reading the toolstack's libraries: {e}") from None
    return found


def _build_base(dest, kernel_root, busybox_root, utils_root, lib_roots, shim):
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "run", "tmp", "etc/xen", "jobs", "lib/modules",
              "var/lib", "var/log"):
        c.dir(d)
    # Linux opens /dev/console for init before /init can mount devtmpfs.
    c.chardev("dev/console", 5, 1)
    c.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    c.file("bin/busybox", (busybox_root / "bin/busybox").read_bytes(), 0o755)
    applets = subprocess.run([str(busybox_root / "bin/busybox"), "--list"], capture_output=True,
                             text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            c.symlink(f"bin/{a}", "busybox")
    mods = {p.stem: p for p in kernel_root.glob("lib/modules/*/kernel/drivers/**/*.ko")}
    for m in MODULES + VIRTIO_MODULES:
        c.file(f"lib/modules/{m}.ko", mods[m].read_bytes())
    tools = {t: (utils_root / XEN_BIN / t).read_bytes() for t in TOOLS}
    for t, data in tools.items():
        c.file(f"{XEN_BIN}/{t}", data, 0o755)
    libs = _collect_libs(lib_roots, list(tools.values()), DLOPENED)
    for name, data in sorted(libs.items()):
        c.file(f"lib/x86_64-linux-gnu/{name}", data, 0o755)
    c.dir("lib64")
    c.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    c.file(SHIM_PATH, Path(shim).read_bytes(), 0o644)
    # Dom0 keeps the memory Xen gave it: no ballooning to make room for guests.
    c.file("etc/xen/xl.conf", b'autoballoon="off"\n')
    raw = c.finish()
    with open(dest, "wb") as f:
        # mtime=0 and no file name in the header (it would be the temporary name, with a pid):
        # same inputs, same bytes, so a rebuilt initramfs keeps the dom0 snapshot's key. Level 6
        # is a fair size/time trade; the kernel's gunzip speed hardly depends on it.
        with gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(raw)
        # The job archive appended at run time must start 4-byte aligned.
        f.write(b"\0" * (-f.tell() % 4))
    return len(raw)


def prepare():
    """Fetch and assemble everything the toolstack boot needs; cached, so cheap the second time.

    Returns {"xen", "shim", "vmlinux", "initramfs", "kernel"} (paths, and the kernel package name).
    """
    with provision.cache_lock():
        provision.ensure_qemu()
        xen = provision.ensure_xen()
        kernel_pkg = provision.resolve_dependency(KERNEL_META, "linux-image-")
        debs = provision.fetch_debs([kernel_pkg, "busybox-static", *LIB_PACKAGES])
        WORK.mkdir(parents=True, exist_ok=True)

        kernel_root = _kernel_tree(kernel_pkg, debs[kernel_pkg])
        vmlinuz = next(kernel_root.glob("boot/vmlinuz-*"))
        vmlinux = WORK / f"vmlinux-{vmlinuz.name.removeprefix('vmlinuz-')}"
        t0 = time.monotonic()
        if provision.make_artifact(vmlinux, lambda tmp: extract_vmlinux(vmlinuz, tmp),
                                   f"{vmlinux.name}", key=debs[kernel_pkg].name):
            log(f"unpacked {vmlinux.name} ({mib(vmlinux.stat().st_size)}) from {vmlinuz.name} "
                f"in {time.monotonic() - t0:.1f} s")

        # The base image's name is a digest of everything that goes into it.
        key = hashlib.sha256()
        for part in (str(BASE_FORMAT), kernel_pkg, *sorted(p.name for p in debs.values()),
                     xen["utils"].joinpath(".unpacked-from").read_text()):
            key.update(part.encode() + b"\0")
        key.update(INIT_SCRIPT.read_bytes())
        base = WORK / f"base-{key.hexdigest()[:16]}.cpio.gz"
        busybox_root, *lib_roots = provision.unpack_debs(
            [(debs[p], WORK / "pkgs" / p) for p in ["busybox-static", *LIB_PACKAGES]])
        t0 = time.monotonic()
        sizes = []

        def build(tmp):
            sizes.append(_build_base(tmp, kernel_root, busybox_root, xen["utils"], lib_roots,
                                     xen["shim"]))

        if provision.make_artifact(base, build, "the dom0 initramfs"):
            log(f"built the dom0 initramfs {base.name} ({mib(sizes[0])}, "
                f"{mib(base.stat().st_size)} gzipped) in {time.monotonic() - t0:.1f} s")
            for old in WORK.glob("base-*.cpio.gz"):
                if old != base:
                    old.unlink()
                    old.with_name(old.name + ".ok").unlink(missing_ok=True)
    return {"xen": xen["xen"], "shim": xen["shim"], "vmlinux": vmlinux, "initramfs": base,
            "kernel": kernel_pkg}


# ---------------------------------------------------------------------------------------------
# run_jobs()


def xl_string(s):
    """An xl config string literal: xl's lexer takes \\" and \\\\ inside double quotes. Control
    characters are refused before this (options.check_guest_options)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in s):
        raise HarnessError(f"cannot hand {s!r} to xl: it contains control characters")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def xl_config(job, domname, kernel_path):
    lines = [f"name = {xl_string(domname)}"]
    if job.kind == "pv":
        lines.append('type = "pv"')
    elif job.kind == "shim":
        # libxl boots the shim as a PVH kernel and hands it the guest as a module whose command
        # line is `extra`.
        lines += ['type = "pvh"', "pvshim = 1", f'pvshim_path = "{SHIM_PATH}"',
                  'pvshim_cmdline = "pv-shim console=xen,pv"']
    else:
        raise HarnessError(f"job {job.name}: kind must be 'pv' or 'shim', not {job.kind!r}")
    lines += [f'kernel = "{kernel_path}"', f"memory = {job.memory}", f"vcpus = {job.vcpus}",
              f"extra = {xl_string(job.cmdline)}",
              # Keep a stopped domain around: its state tells crash from poweroff, and
              # xenconsoled still drains its console ring until we destroy it.
              'on_poweroff = "preserve"', 'on_reboot = "preserve"', 'on_crash = "preserve"']
    return "\n".join(lines) + "\n"


def init_env():
    """/jobs/env, sourced by init.sh: the verdict names and the result line, from Verdict."""
    return (f"RESULT_RE='{RESULT_RE.pattern.replace(chr(92), '')}'\n"
            f"RESULT_PREFIX_LEN={len(RESULT_PREFIX)}\n"
            f"V_CRASH={Verdict.CRASH} V_HANG={Verdict.HANG} V_TIMEOUT={Verdict.TIMEOUT}\n")


def job_archive(jobs, silence, timeout):
    c = Cpio()
    c.dir("jobs")
    guests = {}
    listing = []
    for i, job in enumerate(jobs, 1):
        data = Path(job.guest).read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:12]
        path = f"/jobs/guest-{digest}"
        if digest not in guests:
            guests[digest] = path
            c.file(path, data)
        domname = f"j{i}-{job.name}"
        c.file(f"jobs/{i}.cfg", xl_config(job, domname, path).encode())
        quiet = job.silence or silence
        limit = job.timeout or timeout
        listing.append(f"{i} {domname} {max(1, round(quiet))} {max(1, round(limit))} {job.name}\n")
    c.file("jobs/list", "".join(listing).encode())
    c.file("jobs/env", init_env().encode())
    return c.finish()


def qemu_args(paths, initrd, jobs):
    memory = max(QEMU_MEM_MB, DOM0_MEM_MB + MACHINE_OVERHEAD_MB + max(j.memory for j in jobs))
    smp = max(2, *(j.vcpus for j in jobs))
    xen_args = machine.xen_cmdline(DOM0_MEM_MB, 1, ["bootscrub=0"])
    return machine.qemu_xen(paths["xen"], [(paths["vmlinux"], DOM0_CMDLINE), (initrd, "")],
                            xen_args, memory, smp)


# Serial lines that mean Xen or dom0 is gone: no more markers will come.
FATAL_RES = [
    re.compile(r"Panic on CPU"),
    re.compile(r"Hardware Dom0 (crashed|shutdown)"),
    re.compile(r"Kernel panic - not syncing"),
]
# After the last job's result line: time for its last console lines before qemu is ended.
LAST_RESULT_GRACE = 0.15
MARK_RE = re.compile(r"^@@(\w+)(?: (.*))?$")
JOBLINE_RE = re.compile(r"^\[([A-Za-z0-9_.+-]+)\] ?(.*)$")


class JobMonitor:
    """Turns the toolstack dom0's serial lines into job results: `@@` markers from init.sh
    (never shown to the user), `[job] …` console lines, and Xen's reports about the running job.
    `feed(line)` returns Verdict.SUCCESS when dom0 finished every job, (Verdict.SUCCESS, grace)
    on the last job's result line, Verdict.CRASH when dom0 died, None otherwise."""

    def __init__(self, names, echo=True, verbose=False, out=None, clock=time.monotonic,
                 on_waiting=None, nonce=None):
        self.names = list(names)
        # Called at @@waiting (dom0 polls its payload disk): the moment to snapshot the machine
        # and hand in the payload. `nonce`: the payload dom0 must report (@@payload).
        self.on_waiting, self.nonce = on_waiting, nonce
        self.echo, self.verbose = echo, verbose
        self.out = out or sys.stdout
        self.clock = clock
        self.qemu_start = clock()
        self.results = {}
        self.lines_of = {n: [] for n in self.names}
        self.other = []
        self.current = None
        self.started = None
        self.ready_after = None
        self.phases = []         # (label, seconds of dom0 uptime) from @@t markers
        self.times = {}          # host clock: "ready", "payload", "start/NAME", "first/NAME",
        #                          "result/NAME" (first occurrence each)
        self.early = None        # the last job, judged on its result line (see feed)

    def _print(self, text):
        if self.echo:
            print(text, file=self.out, flush=True)

    def feed(self, line):
        m = MARK_RE.match(line)
        if m:
            return self._marker(m.group(1), m.group(2) or "")
        m = JOBLINE_RE.match(line)
        if m and m.group(1) in self.lines_of:
            name, text = m.group(1), m.group(2)
            self.lines_of[name].append(text)
            self._print(line)
            self.times.setdefault(f"first/{name}", self.clock())
            v = parse_result_line(text)
            if v is not None:
                self.times.setdefault(f"result/{name}", self.clock())
            if (v is not None and name == self.names[-1] and name == self.current
                    and name not in self.results):
                # The last job's result line decides it (dom0 would report the same verdict
                # after tearing the domain down, ~1 s later): end after a short grace for the
                # guest's last lines.
                self.early = name
                self.results[name] = Result(v, self.clock() - (self.started or self.clock()),
                                            self.clock() - self.qemu_start, self.lines_of[name])
                self._print(f"[{name}] {v} after {self.results[name].seconds:.1f} s")
                return Verdict.SUCCESS, LAST_RESULT_GRACE
            return None
        self.other.append(line)
        cur = self.current
        if cur in self.lines_of and line.startswith("(XEN)"):
            # Xen's own report of what the running job's domain did (e.g. "d1v0 Unhandled: vec
            # 14, #PF", "Domain 1 (vcpu#0) crashed"): it belongs in that job's tail.
            self.lines_of[cur].append("host: " + line)
            self._print(f"[{cur}] host: {line}")
            return None
        if self.verbose:
            self._print(f"[xen/dom0] {line}")
        if any(r.search(line) for r in FATAL_RES):
            return Verdict.CRASH
        return None

    def _marker(self, kind, rest):
        if kind in ("ready", "payload", "done"):
            self.times.setdefault(kind, self.clock())
        elif kind in ("start", "job"):
            self.times.setdefault(f"{kind}/{rest.split(' ')[0]}", self.clock())
        if kind == "ready":
            self.ready_after = self.clock() - self.qemu_start
            self._print(f"[dom0] toolstack ready after {self.ready_after:.1f} s")
        elif kind == "waiting":
            if self.on_waiting is None:
                self.other.append("dom0 waits for a payload disk nobody will write")
                return Verdict.CRASH
            self.on_waiting()
        elif kind == "payload":
            if rest != self.nonce:
                self.other.append(f"dom0 unpacked payload {rest!r}, not this run's "
                                  f"{self.nonce!r}")
                self._print(f"[dom0] unpacked payload {rest!r}, not this run's {self.nonce!r}")
                return Verdict.CRASH
        elif kind == "t":
            label, _, centis = rest.partition(" ")
            if centis.isdigit():
                self.phases.append((label, int(centis) / 100))
                self.times.setdefault(f"t/{label}", self.clock())
        elif kind == "start":
            self.current, self.started = rest, self.clock()
        elif kind == "job":
            name, verdict, secs = (rest.split() + ["", "", ""])[:3]
            if name in self.lines_of and name != self.early:
                try:
                    seconds = float(secs)
                except ValueError:
                    seconds = self.clock() - (self.started or self.clock())
                try:
                    v = Verdict(verdict)
                except ValueError:
                    v = Verdict.CRASH
                    self.lines_of[name].append(f"(dom0 reported an unknown verdict {verdict!r})")
                self.results[name] = Result(v, seconds, self.clock() - self.qemu_start,
                                            self.lines_of[name])
                self.current = None
                self._print(f"[{name}] {v} after {seconds:.1f} s")
        elif kind == "done":
            return Verdict.SUCCESS
        elif kind == "fatal":
            self.other.append(f"dom0 setup failed: {rest}")
            self._print(f"[dom0] setup failed: {rest}")
            return Verdict.CRASH
        return None

    def finish(self, machine_result):
        """Results for every job; jobs that did not report get the machine's verdict and the
        serial's tail."""
        if machine_result.verdict == Verdict.SUCCESS:
            return self.results
        why = {Verdict.TIMEOUT: Verdict.TIMEOUT, Verdict.HANG: Verdict.HANG}.get(
            machine_result.verdict, Verdict.CRASH)
        serial_tail = tail_lines(self.other)
        for n in self.names:
            if n not in self.results:
                self.results[n] = Result(why, 0.0, machine_result.seconds, self.lines_of[n],
                                         context=f"-- serial (qemu: {machine_result.verdict}) --\n"
                                                 f"{serial_tail}")
        if not self.verbose:
            self._print(f"-- qemu ended {machine_result.verdict} after "
                        f"{machine_result.seconds:.1f} s; serial tail --\n{serial_tail}")
        return self.results


def run_jobs(jobs, silence=DEFAULT_SILENCE, timeout=120.0, echo=True, verbose=None, cold=None):
    """Run `jobs` in order as domUs in one dom0; return {job name: Result}.

    The dom0 is restored from the cached snapshot (taken by the first run that finds none; see
    snapshot.py) unless `cold` (default: env XENPV_COLD=1) or the jobs need a larger machine than
    the snapshot's: then it boots as a whole with the jobs in its initramfs.

    A job is destroyed as HANG after `silence` seconds without console output, as TIMEOUT after
    `timeout` seconds from `xl create` (a Job may set its own). With `echo`, guest console lines
    stream to stdout as "[name] line"; dom0 and Xen lines too when `verbose` (default: env
    XENPV_VERBOSE=1).
    """
    if verbose is None:
        verbose = os.environ.get("XENPV_VERBOSE") == "1"
    if cold is None:
        cold = os.environ.get("XENPV_COLD") == "1"
    names = [j.name for j in jobs]
    for j in jobs:
        if not NAME_RE.match(j.name):
            raise HarnessError(f"job name {j.name!r}: use letters, digits and _.+- only")
        if j.kind not in ("pv", "shim"):
            raise HarnessError(f"job {j.name}: kind must be 'pv' or 'shim'")
        if len(j.cmdline.encode()) > LIMITS["domu"]:
            raise HarnessError(f"job {j.name}: guest options longer than {LIMITS['domu']} bytes")
    if len(set(names)) != len(names):
        raise HarnessError("job names must be unique")
    LAST_RUN.clear()
    LAST_RUN["begin"] = time.monotonic()
    paths = prepare()
    extra = job_archive(jobs, silence, timeout)
    WORK.mkdir(parents=True, exist_ok=True)
    total = BOOT_ALLOWANCE + sum((j.timeout or timeout) + 20 for j in jobs)
    quiet = max(j.silence or silence for j in jobs) + XL_CREATE_ALLOWANCE

    if not cold and not snapshot_fits(jobs):
        log(f"these guests need a larger machine than the dom0 snapshot's "
            f"({SNAPSHOT_GUEST_MEM_MB} MiB, {SNAPSHOT_MAX_VCPUS} vCPUs per guest): booting cold")
        cold = True
    how = "cold boot"
    if cold:
        mon = JobMonitor(names, echo=echo, verbose=verbose)
        initrd = WORK / f"run-{os.getpid()}.cpio"
        with open(initrd, "wb") as out, open(paths["initramfs"], "rb") as base:
            shutil.copyfileobj(base, out)
            out.write(extra)
        try:
            LAST_RUN["qemu"] = time.monotonic()
            out = run_qemu(qemu_args(paths, initrd, jobs), timeout=total, silence=quiet,
                           echo=False, judge=mon.feed, grace=0.0)
        finally:
            initrd.unlink(missing_ok=True)
    else:
        mon, out, how = Snapshots(paths, echo).run(names, extra, total, quiet, echo, verbose)
    LAST_RUN.update(end=time.monotonic(), how=how, monitor=mon)
    results = mon.finish(out)
    if echo and out.verdict == Verdict.SUCCESS:
        log(f"qemu ({how}): {out.seconds:.1f} s for {len(jobs)} job(s)")
    return results


# How the last run_jobs() went: "how" dom0 came up, host clock times "begin", "qemu" (started),
# "running" (a restored machine was continued), "end", and the JobMonitor ("monitor").
LAST_RUN = {}


def timing_breakdown(run=None):
    """[(phase, seconds)] of the last run_jobs(), from its host-side times."""
    run = run or LAST_RUN
    mon = run.get("monitor")
    if not mon or "qemu" not in run:
        return []
    t = mon.times
    out = [("harness before qemu", run["qemu"] - run["begin"])]
    if "running" in run:
        out.append(("qemu start -> restored machine running", run["running"] - run["qemu"]))
        mark = run["running"]
    else:
        mark = t.get("ready", run["qemu"])
        out.append(("qemu start -> dom0 toolstack ready (boot)", mark - run["qemu"]))
    if "payload" in t:
        out.append(("jobs handed in (payload disk)", t["payload"] - mark))
        if {"t/header", "t/read"} <= t.keys():
            out += [("  running -> dom0 found the header", t["t/header"] - mark),
                    ("  header -> body read and checked", t["t/read"] - t["t/header"]),
                    ("  body -> unpacked", t["payload"] - t["t/read"])]
    for name in mon.names:
        start = t.get(f"start/{name}")
        if start is None:
            break
        first = t.get(f"first/{name}", start)
        out.append((f"{name}: xl create -> first console line", first - start))
        if f"result/{name}" in t:
            out.append((f"{name}: first line -> result line", t[f"result/{name}"] - first))
    last = max(t.values(), default=run["end"])
    out.append(("after the last result (teardown, grace)", run["end"] - last))
    return out


def machine_shape(jobs):
    """(memory MiB, vCPUs) of the machine that runs `jobs`."""
    memory = max(QEMU_MEM_MB, DOM0_MEM_MB + MACHINE_OVERHEAD_MB + max(j.memory for j in jobs))
    return memory, max(2, *(j.vcpus for j in jobs))


# The snapshot's machine: QEMU_MEM_MB and two processors, as a cold boot (with one, dom0 and the
# guest share it: measured 4.4-5.7 s per warm domu run against 3.0-4.6 s with two).
SNAPSHOT_CPUS = 2
SNAPSHOT_GUEST_MEM_MB = QEMU_MEM_MB - DOM0_MEM_MB - MACHINE_OVERHEAD_MB
SNAPSHOT_MAX_VCPUS = 2


def snapshot_fits(jobs):
    """Can `jobs` run in the snapshot's machine?"""
    return (all(j.memory <= SNAPSHOT_GUEST_MEM_MB for j in jobs)
            and all(j.vcpus <= SNAPSHOT_MAX_VCPUS for j in jobs))


class SnapshotBroken(Exception):
    """The state could not be restored (it is removed and taken again)."""


class Snapshots:
    """The dom0 snapshot for this Xen, kernel and initramfs: restore it, or boot, take it and go
    on with the jobs (see snapshot.py)."""

    LOCK = "toolstack/state.lock"

    def __init__(self, paths, echo=True):
        self.paths = paths
        self.comp, self.ext, self.compress, self.decompress = snapshot.compressor()
        self.template = self.machine_args(snapshot.PAYLOAD_PLACEHOLDER)
        digests = {role: provision.stamped_digest(paths[role])
                   for role in ("xen", "vmlinux", "initramfs")}
        self.key = snapshot.cache_key(snapshot.qemu_identity(), self.template, digests,
                                      INIT_SCRIPT.read_bytes(), self.comp)
        self.state = snapshot.state_path(WORK, self.key, self.ext)

    def machine_args(self, disk):
        p = self.paths
        xen_args = machine.xen_cmdline(DOM0_MEM_MB, 1, ["bootscrub=0"])
        modules = [(p["vmlinux"], DOM0_CMDLINE), (p["initramfs"], "")]
        return (machine.qemu_xen(p["xen"], modules, xen_args, QEMU_MEM_MB, SNAPSHOT_CPUS)
                + snapshot.payload_drive_args(disk))

    def run(self, names, body, total, quiet, echo, verbose):
        """(JobMonitor, qemu's Result, how dom0 came up) for one run of the jobs in `body`."""
        nonce = os.urandom(8).hex()
        tmpdir = Path(tempfile.mkdtemp(prefix="xenpv-"))
        _remove_orphaned_payload_disks()
        disk = WORK / f"payload-{os.getpid()}.img"
        try:
            for attempt in range(2):
                if not snapshot.state_ok(self.state, self.key):
                    with contextlib.ExitStack() as lock:
                        lock.enter_context(provision.cache_lock(
                            self.LOCK, "taking the dom0 snapshot"))
                        if not snapshot.state_ok(self.state, self.key):
                            self._say_why_missing()
                            mon = JobMonitor(names, echo=echo, verbose=verbose, nonce=nonce)
                            out = self._boot_and_take(mon, lock, tmpdir, disk, nonce, body,
                                                      total, quiet)
                            return mon, out, "cold boot, snapshot taken"
                mon = JobMonitor(names, echo=echo, verbose=verbose, nonce=nonce)
                try:
                    out = self._restore(mon, tmpdir, disk, nonce, body, total, quiet)
                    return mon, out, "restored snapshot"
                except SnapshotBroken as e:
                    log(f"{self.state.name} could not be restored ({e}): taking it again")
                    snapshot.remove_state(self.state)
                    self.broken = True
            raise HarnessError("the dom0 snapshot could not be restored even after taking it "
                               "again; scripts/run --cold boots without it")
        finally:
            disk.unlink(missing_ok=True)
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _why_not_restored(self, dec, proc):
        """The decompressor's complaint (a damaged file) or qemu's (a state it cannot load)."""
        try:
            dec.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if dec.returncode is not None and dec.returncode > 0:
            err = dec.stderr.read().decode(errors="replace").strip()
            return f"{' '.join(self.decompress)}: {err or f'exit {dec.returncode}'}"
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            if dec.returncode:  # killed by a signal, e.g. SIGPIPE
                return f"{' '.join(self.decompress)} ended by signal {-dec.returncode}"
            return None
        return f"qemu exited: {_qemu_said(proc) or f'status {proc.returncode}'}"

    def _say_why_missing(self):
        others = [p for p in WORK.glob("state-*") if not p.name.endswith(".ok")]
        if getattr(self, "broken", False):
            return
        if self.state.exists():
            log(f"{self.state.name} is damaged or incomplete (its stamp does not match): "
                "taking the dom0 snapshot again")
        elif others:
            log(f"the dom0 snapshot is out of date (qemu, its command line, Xen, the kernel, "
                f"the initramfs or /init changed): taking {self.state.name}")
        else:
            log(f"no dom0 snapshot yet: booting and taking {self.state.name}")

    def _qemu(self, tmpdir, disk):
        sock = tmpdir / "qmp.sock"
        return [*self.machine_args(disk), "-qmp", f"unix:{sock},server=on,wait=off"], sock

    def _boot_and_take(self, mon, lock, tmpdir, disk, nonce, body, total, quiet):
        snapshot.write_payload_disk(disk)
        args, sock = self._qemu(tmpdir, disk)
        state, key = self.state, self.key
        t_boot = time.monotonic()

        def on_waiting():
            t0 = time.monotonic()
            qmp = Qmp(sock)
            tmp = state.with_name(f".{state.name}.tmp{os.getpid()}")
            try:
                qmp.cmd("stop")
                qmp.cmd("migrate-set-parameters", **{"max-bandwidth": snapshot.MAX_BANDWIDTH})
                qmp.cmd("migrate", uri="exec:" + " ".join(self.compress) + " > "
                        + shlex.quote(str(tmp)))
                status = {}
                while True:
                    status = qmp.cmd("query-migrate")
                    if status.get("status") in ("completed", "failed", "cancelled"):
                        break
                    time.sleep(0.02)
                err = (status.get("error-desc") or status.get("status")
                       if status.get("status") != "completed" else
                       snapshot.check_decompresses(tmp, self.decompress))
                if err:
                    log(f"could not save the dom0 snapshot ({err}); this run goes on without it")
                else:
                    provision.write_stamp(tmp, key)
                    stamp = provision.stamp_path(tmp).read_text()
                    os.replace(tmp, state)
                    write_atomic(provision.stamp_path(state), stamp)
                    snapshot.remove_other_states(WORK, state)
                    log(f"booted in {t0 - t_boot:.1f} s, saved the dom0 snapshot {state.name} "
                        f"({mib(state.stat().st_size)}, {self.comp}) in "
                        f"{time.monotonic() - t0:.1f} s")
            finally:
                tmp.unlink(missing_ok=True)
                provision.stamp_path(tmp).unlink(missing_ok=True)
                lock.close()
            snapshot.write_payload_disk(disk, nonce, body)
            qmp.cmd("cont")
            qmp.close()

        mon.on_waiting = on_waiting
        LAST_RUN["qemu"] = time.monotonic()
        return run_qemu(args, timeout=total, silence=quiet, echo=False, judge=mon.feed,
                        grace=0.0)

    def _restore(self, mon, tmpdir, disk, nonce, body, total, quiet):
        snapshot.write_payload_disk(disk, nonce, body)
        args, sock = self._qemu(tmpdir, disk)
        try:
            src = open(self.state, "rb")
        except OSError as e:
            raise SnapshotBroken(e.strerror) from None
        with src:
            dec = subprocess.Popen(self.decompress, stdin=src, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        fd = dec.stdout.fileno()
        args += ["-incoming", f"fd:{fd}"]
        LAST_RUN["qemu"] = time.monotonic()

        def on_start(proc):
            t0 = time.monotonic()
            dec.stdout.close()
            alive = lambda: proc.poll() is None  # noqa: E731
            try:
                qmp = Qmp(sock, alive=alive)
                qmp.wait_status(("paused", "running"), timeout=60, alive=alive)
            except QmpError as e:
                raise SnapshotBroken(self._why_not_restored(dec, proc) or str(e)) from None
            try:
                dec.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            if dec.returncode != 0:
                raise SnapshotBroken(self._why_not_restored(dec, proc)
                                     or f"{self.comp} did not finish")
            qmp.cmd("cont")
            qmp.close()
            LAST_RUN["running"] = time.monotonic()
            if mon.echo:
                log(f"restored the dom0 snapshot in {time.monotonic() - t0:.2f} s")

        try:
            return run_qemu(args, timeout=total, silence=quiet, echo=False, judge=mon.feed,
                            grace=0.0, on_start=on_start, pass_fds=(fd,))
        finally:
            if dec.poll() is None:
                dec.kill()
            dec.wait()
            dec.stderr.close()


def _remove_orphaned_payload_disks():
    """Payload disks of runs that were killed before they could remove them."""
    for f in WORK.glob("payload-*.img"):
        pid = f.stem.removeprefix("payload-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            f.unlink(missing_ok=True)


def _qemu_said(proc):
    """What a dead qemu printed (its error), if anything."""
    if proc.poll() is None:
        return ""
    try:
        out = os.read(proc.stdout.fileno(), 65536).decode(errors="replace").strip()
        return "; ".join(out.splitlines()[-2:])[-400:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Probe for qemu's own Xen emulation (KVM), which would let the shim boot without Xen + dom0.

KVM_GET_API_VERSION = 0xAE00
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_XEN_HVM = 38
# What QEMU's Xen emulation insists on (KVM_XEN_HVM_CONFIG_HYPERCALL_MSR | INTERCEPT_HCALL |
# SHARED_INFO).
KVM_XEN_REQUIRED = 0x1 | 0x2 | 0x4


def kvm_xen_probe(qemu="qemu-system-x86_64"):
    """(usable, explanation): can `qemu -accel kvm,xen-version=...` emulate Xen here?"""
    problems = []
    try:
        first = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                               timeout=10).stdout.splitlines()[0]
        m = re.search(r"version (\d+)\.(\d+)", first)
        ver = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        if ver < (8, 2):
            problems.append(f"qemu is {ver[0]}.{ver[1]}; Xen emulation with a PV console needs "
                            ">= 8.2")
    except (OSError, subprocess.SubprocessError, IndexError):
        problems.append(f"{qemu} not found")
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        problems.append(f"/dev/kvm unusable ({e.strerror})")
    else:
        try:
            api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
            caps = fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_XEN_HVM)
            if caps & KVM_XEN_REQUIRED != KVM_XEN_REQUIRED:
                problems.append(f"host kernel lacks KVM Xen support (KVM API {api}, "
                                f"KVM_CAP_XEN_HVM = {caps:#x}; needs CONFIG_KVM_XEN)")
        except OSError as e:
            problems.append(f"KVM ioctls on /dev/kvm failed ({e.strerror})")
        finally:
            os.close(fd)
        if Path("/sys/module/kvm_pvm").exists():
            problems.append("/dev/kvm is a PVM backend (kvm_pvm), which cannot run Xen")
    if problems:
        return False, "; ".join(problems)
    return True, "qemu >= 8.2 and KVM with KVM_CAP_XEN_HVM: qemu's Xen emulation is usable"


# ---------------------------------------------------------------------------------------------
# CLI (python3 -m lib.toolstack, from scripts/)


def main(argv=None):
    from ..cli import split_guest_options
    from ..options import check_guest_options, positive_seconds
    argv, guest_opts = split_guest_options(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python3 -m lib.toolstack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", type=Path, help="guest kernel ELF")
    ap.add_argument("--kind", choices=["pv", "shim", "both"], default="both")
    ap.add_argument("--timeout", type=positive_seconds, default=120.0,
                    help="per job: seconds from xl create to the result (TIMEOUT)")
    ap.add_argument("--silence", type=positive_seconds, default=DEFAULT_SILENCE,
                    help="per job: seconds without console output (HANG)")
    ap.add_argument("-v", "--verbose", action="store_true", help="also show Xen and dom0 lines")
    ap.add_argument("--probe-kvm-xen", action="store_true",
                    help="only report whether qemu's KVM Xen emulation is usable")
    ap.add_argument("--selftest", action="store_true",
                    help="check the verdicts: the guest (if given) as pv and shim, plus tiny "
                         "kernels that crash, power off silently, hang, or are no ELF at all")
    args = ap.parse_args(argv)
    if args.probe_kvm_xen:
        ok, why = kvm_xen_probe()
        print(f"kvm-xen: {'usable' if ok else 'unusable'}: {why}")
        return 0 if ok else 1
    cmdline = check_guest_options(guest_opts, ["domu", "shim"])
    if args.selftest:
        return selftest(args.guest, cmdline, args.verbose)
    if args.guest is None:
        ap.error("--guest is required")
    kinds = ["pv", "shim"] if args.kind == "both" else [args.kind]
    label = {"pv": "domu", "shim": "shim"}
    jobs = [Job(label[k], k, args.guest, cmdline) for k in kinds]
    results = run_jobs(jobs, silence=args.silence, timeout=args.timeout, verbose=args.verbose)
    return 0 if report(jobs, results) else 1


def report(jobs, results, expected=None):
    """Print one `== name: VERDICT (s)` line per job; True if each got `expected[name]` (default
    SUCCESS)."""
    ok = True
    for j in jobs:
        r = results[j.name]
        want = (expected or {}).get(j.name, Verdict.SUCCESS)
        note = "" if expected is None or r.verdict == want else f"  [expected {want}]"
        print(f"== {j.name}: {r.verdict} ({r.seconds:.1f} s){note}")
        if not r.verdict.from_guest and expected is None:
            print(f"-- last console lines of {j.name} --\n{r.tail()}")
        ok = ok and r.verdict == want
    return ok


def fake_jobs(directory, silence=3.0):
    """Jobs with tiny kernels that misbehave, and the verdict each must get."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    notelf = d / "not-an-elf"
    notelf.write_text("this is not a kernel\n")
    jobs = [Job("notelf", "pv", notelf)]
    for kind in ("pv", "shim"):
        jobs.append(Job(f"crash-{kind}", kind, fake_guests.write("crash", d / "crash")))
        jobs.append(Job(f"poweroff-{kind}", kind, fake_guests.write("poweroff", d / "poweroff")))
    jobs.append(Job("hang", "pv", fake_guests.write("hang", d / "hang"), silence=silence))
    expected = {j.name: Verdict.CRASH for j in jobs}
    expected["hang"] = Verdict.HANG
    return jobs, expected


def selftest(guest, cmdline, verbose):
    jobs, expected = [], {}
    if guest:
        jobs += [Job("domu", "pv", guest, cmdline), Job("shim", "shim", guest, cmdline)]
        expected.update(domu=Verdict.SUCCESS, shim=Verdict.SUCCESS)
    fakes, fake_expected = fake_jobs(WORK / "selftest")
    jobs += fakes
    expected.update(fake_expected)
    # The last job proves the dom0 is still fine after all that.
    if guest:
        jobs.append(Job("domu-again", "pv", guest, cmdline))
        expected["domu-again"] = Verdict.SUCCESS
    results = run_jobs(jobs, timeout=60, verbose=verbose)
    return 0 if report(jobs, results, expected) else 1

