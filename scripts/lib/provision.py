"""Provision the host: qemu, the Rust target, and Xen from Debian packages in a git-ignored cache.

Everything here is idempotent and safe to run from several processes at once: provisioning holds
an exclusive lock on the cache (`cache_lock()`), trees are unpacked into a temporary folder that
is renamed into place, and files are written under temporary names. Nothing is installed into the
system's boot setup: packages are fetched with `apt-get download` and unpacked with `dpkg -x`.

Every download is checked against the SHA256 apt publishes for it, and everything built from them
carries a stamp with its SHA256 and size: a truncated or damaged file is fetched or built again
(saying so in one line) instead of breaking every later run.
"""

import contextlib
import fcntl
import gzip
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .common import CACHE, ROOT, HarnessError, mib, say, sha256_file, write_atomic

DEBS = CACHE / "debs"
XEN_PACKAGES = ["xen-hypervisor-4.17-amd64", "xen-utils-4.17"]
RUST_TARGET = "x86_64-unknown-none"

__all__ = ["ROOT", "CACHE", "DEBS", "cache_lock", "fetch_debs", "unpack_debs", "extract_from_deb",
           "ensure_base", "ensure_xen", "ensure_qemu", "ensure_rust_target", "resolve_dependency",
           "stamp_ok", "stamp_path", "stamped_digest", "write_stamp", "make_artifact"]


def log(msg):
    say("prepare", msg)


def _run(cmd, what, **kw):
    """subprocess.run that turns a failure into a HarnessError naming `what`."""
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError as e:
        raise HarnessError(f"{what}: {cmd[0]} not found ({e.strerror})") from None
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace").strip() if isinstance(e.stderr, bytes) else ""
        raise HarnessError(f"{what} failed (exit {e.returncode}): {' '.join(map(str, cmd))}"
                           + (f"\n{err}" if err else "")) from None


def _sudo():
    return [] if os.geteuid() == 0 else ["sudo"]


# ---------------------------------------------------------------------------------------------
# The cache lock

_lock_depth = {}


@contextlib.contextmanager
def cache_lock(name=".lock", what=None):
    """Hold the cache's exclusive lock `name` (re-entrant within a process). A second run waits
    here until the first has finished provisioning (or `what`), then finds everything in place.
    `.lock` guards provisioning; the toolstack's snapshot has its own lock, so that building it
    does not hold up a dom0-mode run."""
    if _lock_depth.get(name):
        _lock_depth[name] += 1
        try:
            yield
        finally:
            _lock_depth[name] -= 1
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / name, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run that is {what or f'preparing {CACHE}'} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        _lock_depth[name] = 1
        try:
            yield
        finally:
            _lock_depth[name] = 0
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Stamps: "<sha256> <size> <mtime_ns> <key>" next to a file, written once the file is known good


def _stamp_path(path):
    return Path(path).with_name(Path(path).name + ".ok")


stamp_path = _stamp_path


def stamped_digest(path):
    """The SHA256 of `path`: from its stamp while size and mtime still match it, else
    computed."""
    path = Path(path)
    try:
        digest, size, mtime, _ = _stamp_path(path).read_text().split(" ", 3)
        st = path.stat()
        if st.st_size == int(size) and st.st_mtime_ns == int(mtime):
            return digest
    except (OSError, ValueError):
        pass
    return sha256_file(path)


def write_stamp(path, key="", digest=None):
    path = Path(path)
    st = path.stat()
    digest = digest or sha256_file(path)
    write_atomic(_stamp_path(path), f"{digest} {st.st_size} {st.st_mtime_ns} {key}")


def stamp_ok(path, key=""):
    """True if `path` is the file its stamp describes (built from `key`). The hash is computed
    again only when size or mtime changed, so a warm run costs a stat per file."""
    path = Path(path)
    try:
        digest, size, mtime, stamped_key = _stamp_path(path).read_text().split(" ", 3)
        st = path.stat()
    except (OSError, ValueError):
        return False
    if stamped_key != key or st.st_size != int(size):
        return False
    if st.st_mtime_ns == int(mtime):
        return True
    if sha256_file(path) != digest:
        return False
    write_stamp(path, key, digest)
    return True


def _show(path):
    try:
        return str(Path(path).relative_to(CACHE.parent))
    except ValueError:
        return str(path)


def _damage(path, expected_size=None):
    """Why `path` (which exists) is not what its stamp or apt says."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"{size} of {expected_size} bytes"
    try:
        stamped = int(_stamp_path(path).read_text().split(" ")[1])
        if stamped != size:
            return f"{size} of {stamped} bytes"
    except (OSError, ValueError, IndexError):
        pass
    return "its SHA256 does not match"


def make_artifact(path, make, what, key=""):
    """Build `path` with `make(tmp_path)` unless its stamp says it is already there, intact and
    built from `key`. Returns True if it was (re)built. A damaged file is rebuilt with one line
    saying so."""
    path = Path(path)
    if stamp_ok(path, key):
        return False
    if path.exists() and _stamp_path(path).exists():
        log(f"{_show(path)} is damaged ({_damage(path)}): rebuilding {what}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        make(tmp)
        write_stamp(tmp, key)
        stamp = _stamp_path(tmp).read_text()
        os.replace(tmp, path)
        # The rename keeps size and mtime, so the stamp stays valid.
        write_atomic(_stamp_path(path), stamp)
    finally:
        tmp.unlink(missing_ok=True)
        _stamp_path(tmp).unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------------------------------------
# System packages and the Rust target

_apt_updated = False


def apt_update():
    global _apt_updated
    if not _apt_updated:
        log("apt-get update")
        _run(_sudo() + ["apt-get", "update", "-qq"], "apt-get update", stdout=subprocess.DEVNULL)
        _apt_updated = True


def ensure_system_packages(packages, probe_commands):
    """apt-get install `packages` unless every command in `probe_commands` is already on PATH."""
    if all(shutil.which(c) for c in probe_commands):
        return
    apt_update()
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(_sudo() + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
         "apt-get install " + " ".join(packages), env=env, stdout=subprocess.DEVNULL)
    log(f"installed {' '.join(packages)} in {time.monotonic() - t0:.1f} s")


def ensure_rust_target():
    try:
        out = subprocess.run(["rustup", "target", "list", "--installed"], capture_output=True,
                             text=True, cwd=ROOT).stdout
    except FileNotFoundError:
        raise HarnessError("rustup not found: install Rust with rustup (https://rustup.rs)") from None
    if RUST_TARGET not in out.split():
        t0 = time.monotonic()
        _run(["rustup", "target", "add", RUST_TARGET], f"rustup target add {RUST_TARGET}",
             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log(f"added the Rust target {RUST_TARGET} in {time.monotonic() - t0:.1f} s")


def ensure_qemu():
    ensure_system_packages(["qemu-system-x86"], ["qemu-system-x86_64"])


# ---------------------------------------------------------------------------------------------
# Debian packages


@dataclass
class AptRecord:
    package: str
    version: str
    arch: str
    size: int
    sha256: str

    @property
    def deb_name(self):
        """The file name `apt-get download` gives it (':' of an epoch written as %3a)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def parse_apt_show(text):
    """{package: AptRecord} from `apt-cache show` output."""
    records = {}
    for block in text.split("\n\n"):
        f = {}
        for line in block.splitlines():
            if line[:1] not in (" ", "") and ":" in line:
                k, _, v = line.partition(":")
                f[k] = v.strip()
        if {"Package", "Version", "Architecture", "Size", "SHA256"} <= f.keys():
            records.setdefault(f["Package"], AptRecord(f["Package"], f["Version"],
                                                       f["Architecture"], int(f["Size"]),
                                                       f["SHA256"]))
    return records


def apt_index(packages):
    """AptRecords of the candidate versions of `packages` (one apt-cache call)."""
    for attempt in range(2):
        r = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages],
                           capture_output=True, text=True)
        recs = parse_apt_show(r.stdout)
        missing = [p for p in packages if p not in recs]
        if not missing:
            return recs
        if attempt == 0:
            apt_update()
    raise HarnessError(f"apt knows no package {', '.join(missing)} (is this Debian 12 with "
                       "the main and updates archives?)")


def apt_download(records, dest):
    _run(["apt-get", "download", *(f"{r.package}={r.version}" for r in records)],
         "apt-get download", cwd=dest, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fetch_debs(packages, debs=None, index=apt_index, download=apt_download):
    """The .deb of each of `packages` in the cache, downloaded and verified against apt's SHA256
    when missing or damaged; returns {package: path}. Call with the cache lock held."""
    debs = Path(debs or DEBS)
    debs.mkdir(parents=True, exist_ok=True)
    found, unchecked = {}, []
    for p in packages:
        good = [h for h in sorted(debs.glob(f"{p}_*.deb")) if stamp_ok(h)]
        if good:
            found[p] = good[-1]
        else:
            unchecked.append(p)
    if not unchecked:
        return found
    records = index(unchecked)
    todo = []
    for p in unchecked:
        rec = records[p]
        path = debs / rec.deb_name
        if path.exists():
            if path.stat().st_size == rec.size and sha256_file(path) == rec.sha256:
                write_stamp(path)
                found[p] = path
                continue
            log(f"{path.name} is damaged ({_damage(path, rec.size)}): downloading it again")
            path.unlink()
            _stamp_path(path).unlink(missing_ok=True)
        todo.append(rec)
    if todo:
        t0 = time.monotonic()
        download(todo, debs)
        for rec in todo:
            path = debs / rec.deb_name
            if not path.exists():
                raise HarnessError(f"apt-get download {rec.package}={rec.version} gave no "
                                   f"{path.name} in {debs}")
            digest = sha256_file(path)
            if digest != rec.sha256:
                size = path.stat().st_size
                path.unlink()
                raise HarnessError(f"downloaded {rec.deb_name} ({size} bytes) has SHA256 "
                                   f"{digest}; apt says {rec.sha256} ({rec.size} bytes)")
            write_stamp(path, digest=digest)
            found[rec.package] = path
        total = sum(r.size for r in todo)
        what = todo[0].package if len(todo) == 1 else f"{len(todo)} packages"
        log(f"downloaded {what} ({mib(total)}) in {time.monotonic() - t0:.1f} s")
    return found


def _replace_tree(tmp, dest):
    """Put the finished tree `tmp` at `dest`, moving any old one out of the way first."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old{os.getpid()}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def _unpack_into(dest, key, fill):
    """Make `dest` a tree filled by `fill(tmp_dir)` unless its stamp says it holds `key`.
    Returns True if it unpacked."""
    dest = Path(dest)
    stamp = dest / ".unpacked-from"
    if stamp.exists() and stamp.read_text() == key:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        (tmp / ".unpacked-from").write_text(key)
        _replace_tree(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def unpack_debs(pairs):
    """dpkg -x each (deb, dest) unless dest's stamp says this exact .deb is already there; one
    progress line for all of them. Returns the dest paths."""
    t0 = time.monotonic()
    done = []
    for deb, dest in pairs:
        if _unpack_into(dest, deb.name, lambda tmp, deb=deb: _run(
                ["dpkg", "-x", str(deb), str(tmp)], f"dpkg -x {deb.name}",
                stderr=subprocess.PIPE)):
            done.append(deb.name.split("_", 1)[0])
    if done:
        what = done[0] if len(done) == 1 else f"{len(done)} packages"
        log(f"unpacked {what} in {time.monotonic() - t0:.1f} s")
    return [Path(dest) for _, dest in pairs]


def extract_from_deb(deb, dest, members):
    """Unpack only `members` (tar wildcards such as './boot/vmlinuz-*') of `deb` into `dest`.

    A full `dpkg -x` of a kernel image writes ~400 MB of modules we never load; the stamp records
    the .deb and the member list so a change of either re-extracts.
    """
    def fill(tmp):
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        try:
            _run(["tar", "-x", "-C", str(tmp), "--wildcards", *members],
                 f"extracting from {deb.name}", stdin=tar.stdout, stderr=subprocess.PIPE)
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                raise HarnessError(f"dpkg-deb --fsys-tarfile {deb} failed")

    t0 = time.monotonic()
    if _unpack_into(dest, deb.name + "\n" + "\n".join(members), fill):
        log(f"unpacked {len(members)} files of {deb.name.split('_', 1)[0]} in "
            f"{time.monotonic() - t0:.1f} s")
    return Path(dest)


# ---------------------------------------------------------------------------------------------
# Xen


def gunzip_to(src, dest):
    try:
        with gzip.open(src) as s, open(dest, "wb") as d:
            shutil.copyfileobj(s, d)
    except (OSError, EOFError) as e:
        raise HarnessError(f"cannot gunzip {src}: {e}") from None


def ensure_xen():
    """Paths of the Xen multiboot image and the PV shim, fetching them on first use."""
    with cache_lock():
        debs = fetch_debs(XEN_PACKAGES)
        hv, utils = unpack_debs([(debs["xen-hypervisor-4.17-amd64"], CACHE / "xen" / "hv"),
                                 (debs["xen-utils-4.17"], CACHE / "xen" / "utils")])
        gz = next((hv / "boot").glob("xen-4.17-amd64.gz"), None)
        shim = utils / "usr/lib/xen-4.17/boot/xen-shim"
        if gz is None or not shim.exists():
            raise HarnessError(f"the Xen packages lack boot/xen-4.17-amd64.gz or {shim}")
        elf = CACHE / "xen" / "xen-4.17-amd64.elf"
        t0 = time.monotonic()
        if make_artifact(elf, lambda tmp: gunzip_to(gz, tmp), "the Xen image",
                         key=debs["xen-hypervisor-4.17-amd64"].name):
            log(f"unpacked {elf.name} ({mib(elf.stat().st_size)}) in "
                f"{time.monotonic() - t0:.1f} s")
    return {"xen": elf, "shim": shim, "utils": utils}


def ensure_base():
    ensure_qemu()
    ensure_rust_target()
    return ensure_xen()


def resolve_dependency(meta, prefix):
    """The package a metapackage (`linux-image-amd64`) currently depends on, e.g. the versioned
    kernel image. Falls back to the newest matching .deb already cached when apt has no answer.

    `apt-cache depends` takes ~0.6 s here, so the answer is kept until apt's lists change.
    """
    lists = Path("/var/lib/apt/lists")
    memo = CACHE / f"depends-{meta}"
    for attempt in range(2):
        key = f"{lists.stat().st_mtime_ns if lists.exists() else 0}"
        if memo.exists():
            cached_key, _, dep = memo.read_text().partition("\n")
            if cached_key == key and dep:
                return dep
        out = subprocess.run(["apt-cache", "depends", meta], capture_output=True, text=True).stdout
        for line in out.splitlines():
            dep = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and dep.startswith(prefix):
                memo.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(memo, f"{key}\n{dep}")
                return dep
        if attempt == 0:
            apt_update()
    cached = sorted(DEBS.glob(f"{prefix}*.deb"))
    if cached:
        return cached[-1].name.split("_", 1)[0]
    raise HarnessError(f"cannot resolve which {prefix}* package {meta} depends on")
