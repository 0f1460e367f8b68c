#!/usr/bin/env python3
"""Run the guest as a domU under Xen's toolstack: qemu → Xen → Linux dom0 (initramfs) → `xl create`.

Two kinds of job share one boot: `pv` (a PV domU) and `shim` (a PVH domain running Xen's PV shim,
which runs the guest as its PV domU). The dom0 is Debian's kernel with a busybox initramfs whose
/init (toolstack/init.sh) starts xenstored and xenconsoled and then runs the jobs in order,
printing `@@` markers on the serial line that this module parses.

The base initramfs (busybox, the xen modules, the toolstack binaries and their libraries) is built
once and cached; each run appends a small uncompressed cpio with the guest ELF(s), their xl configs
and the job list (Linux unpacks concatenated archives in order).

usage: toolstack.py --guest PATH [--kind pv|shim|both] [--timeout S] [-v] [-- GUEST OPTIONS...]
"""

import argparse
import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provision  # noqa: E402
from harness import accel_args, run_qemu  # noqa: E402

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "toolstack" / "init.sh"
WORK = provision.CACHE / "toolstack"

# Bump when the layout of the base initramfs changes in a way its inputs do not show.
BASE_FORMAT = 1

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
LIB_DIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu",
            "usr/lib/xen-4.17/lib/x86_64-linux-gnu"]

# Memory: dom0 holds the unpacked initramfs (~13 MB) plus Linux; guests come from the rest
# (320 MB measured enough; bootscrub=0 keeps Xen from scrubbing the rest at boot).
QEMU_MEM_MB = 1024
DOM0_MEM_MB = 320
GUEST_MEM_MB = 64
SHIM_MEM_MB = 96
XEN_CMDLINE = (f"console=com1 com1=115200,8n1 dom0_mem={DOM0_MEM_MB}M,max:{DOM0_MEM_MB}M "
               "dom0_max_vcpus=1 bootscrub=0")
# Quiet Linux: every console byte costs emulated time, and only /init's lines matter here.
# mitigations=off saves ~0.3 s of boot in this throwaway dom0.
DOM0_CMDLINE = "console=hvc0 quiet loglevel=3 nokaslr mitigations=off"
# Budget for Xen + Linux boot + toolstack start (~6 s measured) in the whole-run timeout.
BOOT_ALLOWANCE = 90.0

VERDICTS = ("SUCCESS", "FAILURE", "ERROR", "SKIP", "CRASH", "TIMEOUT")
NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,40}$")


def log(msg):
    print(f"[toolstack] {msg}", file=sys.stderr, flush=True)


@dataclass
class Job:
    name: str
    kind: str          # 'pv' | 'shim'
    guest: Path
    cmdline: str = ""
    memory_mb: int = 0  # 0: GUEST_MEM_MB for pv, SHIM_MEM_MB for shim
    timeout: float = 0  # 0: run_jobs' timeout


@dataclass
class JobResult:
    verdict: str       # SUCCESS FAILURE ERROR SKIP CRASH TIMEOUT
    seconds: float
    tail: str
    since_qemu_start: float = 0.0  # wall time from qemu's start to this job's result
    output: list = field(default_factory=list)  # every console line of the job


# ---------------------------------------------------------------------------------------------
# Building blocks: ELF dependencies, cpio archives, vmlinux


def elf_needed(data):
    """DT_NEEDED sonames of a 64-bit little-endian ELF (empty for anything else)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []

    def file_off(vaddr):
        for v, o, sz in loads:
            if v <= vaddr < v + sz:
                return o + vaddr - v
        raise ValueError(f"vaddr {vaddr:#x} not in a PT_LOAD")

    needed, strtab = [], None
    off, end = dynamic[0], dynamic[0] + dynamic[1]
    while off < end:
        tag, val = struct.unpack_from("<qQ", data, off)
        off += 16
        if tag == 0:
            break
        if tag == 1:
            needed.append(val)
        elif tag == 5:
            strtab = file_off(val)
    names = []
    for n in needed:
        s = strtab + n
        names.append(data[s:data.index(b"\0", s)].decode())
    return names


class Cpio:
    """A newc ("070701") archive, built in memory; entries keep insertion order, so directories
    go in before their contents (the kernel's unpacker does not create parents)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, path):
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, 0o40755)

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path, target):
        path = path.strip("/")
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path, major, minor):
        path = path.strip("/")
        self.dir(path.rsplit("/", 1)[0])
        self._entry(path, 0o20600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def extract_vmlinux(vmlinuz, dest):
    """Unpack the xz stream inside a bzImage: Xen then loads the ELF directly and Linux skips its
    own decompressor, which is slow under TCG."""
    data = Path(vmlinuz).read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise SystemExit(f"{vmlinuz}: no xz stream found")
    out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    if out[:4] != b"\x7fELF":
        raise SystemExit(f"{vmlinuz}: the xz stream is not an ELF")
    tmp = Path(dest).with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(out)
    tmp.rename(dest)


# ---------------------------------------------------------------------------------------------
# prepare()


def _fetch_all():
    kernel_pkg = provision.resolve_dependency(KERNEL_META, "linux-image-")
    debs = provision.fetch_debs([kernel_pkg, "busybox-static", *LIB_PACKAGES])
    return kernel_pkg, debs


def _kernel_tree(kernel_pkg, deb):
    members = ["./boot/vmlinuz-*"] + [f"./lib/modules/*/kernel/drivers/xen/{m}.ko"
                                      for m in ("xen-privcmd", "xen-evtchn", "xen-gntdev",
                                                "xen-gntalloc")]
    members.append("./lib/modules/*/kernel/drivers/xen/xenfs/xenfs.ko")
    return provision.extract_from_deb(deb, WORK / "pkgs" / kernel_pkg, members)


def _collect_libs(trees, roots, extra=()):
    """{soname: bytes} for the DT_NEEDED closure of `roots` (list of bytes) and `extra` (sonames),
    searched in `trees`."""
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
            raise SystemExit(f"no package in the toolstack list provides {name}")
        data = hit.resolve().read_bytes()
        found[name] = data
        todo.extend(elf_needed(data))
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
    mods = {p.stem: p for p in kernel_root.glob("lib/modules/*/kernel/drivers/xen/**/*.ko")}
    for m in MODULES:
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
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        # mtime=0: same inputs, same bytes. Level 6 is a fair size/time trade; the kernel's
        # gunzip speed hardly depends on it.
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(raw)
        # The job archive appended at run time must start 4-byte aligned.
        f.write(b"\0" * (-f.tell() % 4))
    tmp.rename(dest)
    return len(raw)


def prepare():
    """Fetch and assemble everything the toolstack boot needs; cached, so cheap the second time.

    Returns {"xen", "shim", "vmlinux", "initramfs", "kernel"} (paths, and the kernel package name).
    """
    t0 = time.monotonic()
    built = False
    provision.ensure_qemu()
    xen = provision.ensure_xen()
    kernel_pkg, debs = _fetch_all()
    WORK.mkdir(parents=True, exist_ok=True)

    kernel_root = _kernel_tree(kernel_pkg, debs[kernel_pkg])
    vmlinuz = next(kernel_root.glob("boot/vmlinuz-*"))
    vmlinux = WORK / f"vmlinux-{vmlinuz.name.removeprefix('vmlinuz-')}"
    if not vmlinux.exists():
        log(f"extracting {vmlinux.name} from {vmlinuz.name}")
        extract_vmlinux(vmlinuz, vmlinux)
        built = True

    # The base image's name is a digest of everything that goes into it.
    key = hashlib.sha256()
    for part in (str(BASE_FORMAT), kernel_pkg, *sorted(p.name for p in debs.values()),
                 xen["utils"].joinpath(".unpacked-from").read_text()):
        key.update(part.encode() + b"\0")
    key.update(INIT_SCRIPT.read_bytes())
    base = WORK / f"base-{key.hexdigest()[:16]}.cpio.gz"
    if not base.exists():
        log(f"building {base.name}")
        busybox_root = provision.unpack_deb(debs["busybox-static"], WORK / "pkgs" / "busybox-static")
        lib_roots = [provision.unpack_deb(debs[p], WORK / "pkgs" / p) for p in LIB_PACKAGES]
        size = _build_base(base, kernel_root, busybox_root, xen["utils"], lib_roots, xen["shim"])
        log(f"{base.name}: {size >> 20} MiB unpacked, {base.stat().st_size >> 20} MiB gzipped")
        for old in WORK.glob("base-*.cpio.gz"):
            if old != base:
                old.unlink()
        built = True
    if built:
        log(f"prepared in {time.monotonic() - t0:.1f} s")
    return {"xen": xen["xen"], "shim": xen["shim"], "vmlinux": vmlinux, "initramfs": base,
            "kernel": kernel_pkg}


# ---------------------------------------------------------------------------------------------
# run_jobs()


def _xl_string(s):
    """An xl config string literal (xl's parser has no escapes we can rely on: pick the quote)."""
    if "\n" in s or "\\" in s or ('"' in s and "'" in s):
        raise ValueError(f"cannot quote {s!r} for an xl config")
    return f'"{s}"' if '"' not in s else f"'{s}'"


def _xl_config(job, domname, kernel_path):
    mem = job.memory_mb or (SHIM_MEM_MB if job.kind == "shim" else GUEST_MEM_MB)
    lines = [f"name = {_xl_string(domname)}"]
    if job.kind == "pv":
        lines.append('type = "pv"')
    elif job.kind == "shim":
        # libxl boots the shim as a PVH kernel, hands it the guest as a module and builds its
        # command line as "<pvshim_cmdline> -- <extra>".
        lines += ['type = "pvh"', "pvshim = 1", f'pvshim_path = "{SHIM_PATH}"',
                  'pvshim_cmdline = "pv-shim console=xen,pv"']
    else:
        raise ValueError(f"job {job.name}: kind must be 'pv' or 'shim', not {job.kind!r}")
    lines += [f'kernel = "{kernel_path}"', f"memory = {mem}", "vcpus = 1",
              f"extra = {_xl_string(job.cmdline)}",
              # Keep a stopped domain around: its state tells crash from poweroff, and
              # xenconsoled still drains its console ring until we destroy it.
              'on_poweroff = "preserve"', 'on_reboot = "preserve"', 'on_crash = "preserve"']
    return "\n".join(lines) + "\n"


def _job_archive(jobs, timeout):
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
        c.file(f"jobs/{i}.cfg", _xl_config(job, domname, path).encode())
        quiet = job.timeout or timeout
        listing.append(f"{i} {domname} {max(1, round(quiet))} {job.name}\n")
    c.file("jobs/list", "".join(listing).encode())
    return c.finish()


def qemu_args(paths, initrd, smp=2):
    mods = [f"{paths['vmlinux']} {DOM0_CMDLINE}", str(initrd)]
    return ["qemu-system-x86_64", *accel_args(), "-m", str(QEMU_MEM_MB), "-smp", str(smp),
            "-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio",
            "-kernel", str(paths["xen"]), "-append", XEN_CMDLINE,
            # qemu splits -initrd at ',' into multiboot modules; ',,' is a literal comma.
            "-initrd", ",".join(m.replace(",", ",,") for m in mods)]


# Serial lines that mean Xen or dom0 is gone: no more markers will come.
FATAL_RES = [
    re.compile(r"Panic on CPU"),
    re.compile(r"Hardware Dom0 (crashed|shutdown)"),
    re.compile(r"Kernel panic - not syncing"),
    re.compile(r"^@@fatal "),
]
MARK_RE = re.compile(r"^@@(\w+)(?: (.*))?$")
JOBLINE_RE = re.compile(r"^\[([A-Za-z0-9_.+-]+)\] ?(.*)$")
STACK_DUMP_RE = re.compile(r"^(host: )?\(XEN\)\s+([0-9a-f]{16}\s*)+$")


def _tail(lines, n=25):
    """The last `n` lines, with Xen's raw stack dumps cut to 2 lines: they would crowd out the
    lines that say what happened."""
    out, run = [], 0
    for line in lines:
        if STACK_DUMP_RE.match(line):
            run += 1
            if run == 3:
                out.append("    ... (stack dump cut)")
            if run >= 3:
                continue
        else:
            run = 0
        out.append(line)
    return "\n".join(out[-n:])


def run_jobs(jobs, timeout=120, echo=True, verbose=None):
    """Boot once and run `jobs` in order as domUs; return {job name: JobResult}.

    `timeout` is per job: seconds without new console output before the job is destroyed as
    TIMEOUT. With `echo`, guest console lines stream to stdout as "[name] line"; dom0 and Xen
    lines too when `verbose` (default: env XENPV_VERBOSE=1).
    """
    if verbose is None:
        verbose = os.environ.get("XENPV_VERBOSE") == "1"
    names = [j.name for j in jobs]
    for j in jobs:
        if not NAME_RE.match(j.name):
            raise ValueError(f"job name {j.name!r}: use letters, digits and _.+- only")
        if j.kind not in ("pv", "shim"):
            raise ValueError(f"job {j.name}: kind must be 'pv' or 'shim'")
    if len(set(names)) != len(names):
        raise ValueError("job names must be unique")
    paths = prepare()
    extra = _job_archive(jobs, timeout)
    WORK.mkdir(parents=True, exist_ok=True)
    initrd = WORK / f"run-{os.getpid()}.cpio"
    with open(initrd, "wb") as out, open(paths["initramfs"], "rb") as base:
        shutil.copyfileobj(base, out)
        out.write(extra)

    results = {}
    lines_of = {n: [] for n in names}
    state = {"current": None, "started": None}
    other = []

    def on_line(line):
        m = MARK_RE.match(line)
        if m:
            kind, rest = m.group(1), (m.group(2) or "")
            if echo and kind in ("ready", "fatal"):
                print(f"[dom0] {line}", flush=True)
            if kind == "start":
                state["current"], state["started"] = rest, time.monotonic()
            elif kind == "job":
                name, verdict, secs = (rest.split() + ["", "", ""])[:3]
                if name in lines_of:
                    try:
                        seconds = float(secs)
                    except ValueError:
                        seconds = time.monotonic() - (state["started"] or time.monotonic())
                    results[name] = JobResult(verdict, seconds, _tail(lines_of[name]),
                                              time.monotonic() - state["qemu_start"],
                                              lines_of[name])
                    state["current"] = None
                    if echo:
                        print(f"@@job {name} {verdict} {seconds:.1f}", flush=True)
            elif kind == "done":
                return "DONE"
            elif kind == "fatal":
                return "FATAL"
            return None
        m = JOBLINE_RE.match(line)
        if m and m.group(1) in lines_of:
            lines_of[m.group(1)].append(m.group(2))
            if echo:
                print(line, flush=True)
            return None
        other.append(line)
        cur = state["current"]
        if cur in lines_of and line.startswith("(XEN)"):
            # Xen's own report of what the running job's domain did (e.g. "d1v0 Unhandled: vec
            # 14, #PF", "Domain 1 (vcpu#0) crashed"): it belongs in that job's tail.
            lines_of[cur].append("host: " + line)
            if echo:
                print(f"[{cur}] host: {line}", flush=True)
            return None
        if echo and verbose:
            print(f"[xen/dom0] {line}", flush=True)
        if any(r.search(line) for r in FATAL_RES):
            return "FATAL"
        return None

    total = BOOT_ALLOWANCE + sum((j.timeout or timeout) + 20 for j in jobs)
    state["qemu_start"] = time.monotonic()
    try:
        out = run_qemu(qemu_args(paths, initrd), timeout=total, echo=False, done_re=None,
                       crash_res=[], grace=0.0, on_line=on_line)
    finally:
        initrd.unlink(missing_ok=True)

    if out.verdict != "DONE":
        # Xen or dom0 died, or the whole boot timed out: whatever did not report gets the
        # serial's tail so the cause is visible.
        why = {"FATAL": "CRASH", "TIMEOUT": "TIMEOUT"}.get(out.verdict, "CRASH")
        serial_tail = "\n".join(other[-25:])
        for n in names:
            if n not in results:
                own = _tail(lines_of[n])
                tail = (own + "\n" if own else "") + f"-- serial ({out.verdict}) --\n{serial_tail}"
                results[n] = JobResult(why, 0.0, tail, output=lines_of[n])
        if echo and not verbose:
            print(f"-- qemu ended {out.verdict} after {out.seconds:.1f} s; serial tail --\n"
                  f"{serial_tail}", flush=True)
    elif echo:
        log(f"qemu: {out.seconds:.1f} s for {len(jobs)} job(s)")
    return results


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
# CLI


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    guest_opts = []
    if "--" in argv:
        i = argv.index("--")
        argv, guest_opts = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="toolstack.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", type=Path, help="guest kernel ELF")
    ap.add_argument("--kind", choices=["pv", "shim", "both"], default="both")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="per job: seconds without console output before giving up")
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
    if args.selftest:
        return selftest(args.guest, " ".join(guest_opts), args.verbose)
    if args.guest is None:
        ap.error("--guest is required")
    cmdline = " ".join(guest_opts)
    kinds = ["pv", "shim"] if args.kind == "both" else [args.kind]
    label = {"pv": "domu", "shim": "shim"}
    jobs = [Job(label[k], k, args.guest, cmdline) for k in kinds]
    results = run_jobs(jobs, timeout=args.timeout, verbose=args.verbose)
    return 0 if report(jobs, results) else 1


def report(jobs, results, expected=None):
    """Print one `== name: VERDICT (s)` line per job; True if each got `expected[name]` (default
    SUCCESS)."""
    ok = True
    for j in jobs:
        r = results[j.name]
        want = (expected or {}).get(j.name, "SUCCESS")
        note = "" if expected is None or r.verdict == want else f"  [expected {want}]"
        print(f"== {j.name}: {r.verdict} ({r.seconds:.1f} s){note}")
        if r.verdict not in ("SUCCESS", "FAILURE", "ERROR", "SKIP") and expected is None:
            print(f"-- last console lines of {j.name} --\n{r.tail}")
        ok = ok and r.verdict == want
    return ok


def selftest(guest, cmdline, verbose):
    import importlib.util
    spec = importlib.util.spec_from_file_location("fake_guests", HERE / "toolstack" / "fake_guests.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    d = WORK / "selftest"
    d.mkdir(parents=True, exist_ok=True)
    jobs, expected = [], {}
    if guest:
        jobs += [Job("domu", "pv", guest, cmdline), Job("shim", "shim", guest, cmdline)]
    notelf = d / "not-an-elf"
    notelf.write_text("this is not a kernel\n")
    jobs.append(Job("notelf", "pv", notelf))
    for kind in ("pv", "shim"):
        jobs.append(Job(f"crash-{kind}", kind, fake.write("crash", d / "crash")))
        jobs.append(Job(f"poweroff-{kind}", kind, fake.write("poweroff", d / "poweroff")))
    jobs.append(Job("hang", "pv", fake.write("hang", d / "hang"), timeout=5))
    expected = {j.name: "CRASH" for j in jobs}
    expected.update(domu="SUCCESS", shim="SUCCESS", hang="TIMEOUT")
    # The last job proves the dom0 is still fine after all that.
    if guest:
        jobs.append(Job("domu-again", "pv", guest, cmdline))
        expected["domu-again"] = "SUCCESS"
    results = run_jobs(jobs, timeout=60, verbose=verbose)
    return 0 if report(jobs, results, expected) else 1


if __name__ == "__main__":
    sys.exit(main())
