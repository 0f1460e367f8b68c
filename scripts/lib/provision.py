"""Provision the host: qemu, the Rust target, and Xen from Debian packages in a git-ignored cache.

Everything here is idempotent: a second call finds what the first one made and returns at once.
Nothing is installed into the system's boot setup: Xen packages are fetched with `apt-get download`
and unpacked with `dpkg -x` under `.cache/`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
DEBS = CACHE / "debs"

XEN_PACKAGES = ["xen-hypervisor-4.17-amd64", "xen-utils-4.17"]
RUST_TARGET = "x86_64-unknown-none"


def log(msg):
    print(f"[provision] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def _sudo():
    return [] if os.geteuid() == 0 else ["sudo"]


_apt_updated = False


def apt_update():
    global _apt_updated
    if not _apt_updated:
        log("apt-get update")
        run(_sudo() + ["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
        _apt_updated = True


def ensure_system_packages(packages, probe_commands):
    """apt-get install `packages` unless every command in `probe_commands` is already on PATH."""
    if all(shutil.which(c) for c in probe_commands):
        return
    apt_update()
    log("installing " + " ".join(packages))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(_sudo() + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        env=env, stdout=subprocess.DEVNULL)


def fetch_debs(packages):
    """Download .debs for `packages` into .cache/debs (once); return {package: path}."""
    DEBS.mkdir(parents=True, exist_ok=True)
    found = {}
    missing = []
    for p in packages:
        hits = sorted(DEBS.glob(f"{p}_*.deb"))
        if hits:
            found[p] = hits[-1]
        else:
            missing.append(p)
    if missing:
        try:
            log("apt-get download " + " ".join(missing))
            run(["apt-get", "download", *missing], cwd=DEBS, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            apt_update()
            run(["apt-get", "download", *missing], cwd=DEBS, stdout=subprocess.DEVNULL)
        for p in missing:
            hits = sorted(DEBS.glob(f"{p}_*.deb"))
            if not hits:
                raise SystemExit(f"apt-get download {p} produced no .deb in {DEBS}")
            found[p] = hits[-1]
    return found


def unpack_deb(deb, dest):
    """dpkg -x `deb` into `dest` unless a stamp says this exact .deb is already there."""
    dest = Path(dest)
    stamp = dest / ".unpacked-from"
    if stamp.exists() and stamp.read_text() == deb.name:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    run(["dpkg", "-x", str(deb), str(dest)])
    stamp.write_text(deb.name)
    return dest


def ensure_rust_target():
    out = subprocess.run(["rustup", "target", "list", "--installed"], capture_output=True,
                         text=True, cwd=ROOT).stdout
    if RUST_TARGET not in out.split():
        log(f"rustup target add {RUST_TARGET}")
        run(["rustup", "target", "add", RUST_TARGET], cwd=ROOT)


def ensure_qemu():
    ensure_system_packages(["qemu-system-x86"], ["qemu-system-x86_64"])


def ensure_xen():
    """Return paths of the Xen multiboot image and the PV shim, fetching them on first use."""
    debs = fetch_debs(XEN_PACKAGES)
    hv = unpack_deb(debs["xen-hypervisor-4.17-amd64"], CACHE / "xen" / "hv")
    utils = unpack_deb(debs["xen-utils-4.17"], CACHE / "xen" / "utils")
    gz = next((hv / "boot").glob("xen-4.17-amd64.gz"))
    elf = CACHE / "xen" / "xen-4.17-amd64.elf"
    if not elf.exists() or elf.stat().st_mtime < gz.stat().st_mtime:
        import gzip
        tmp = elf.with_suffix(".tmp")
        with gzip.open(gz) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(elf)
    shim = utils / "usr/lib/xen-4.17/boot/xen-shim"
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
                memo.write_text(f"{key}\n{dep}")
                return dep
        if attempt == 0:
            apt_update()
    cached = sorted(DEBS.glob(f"{prefix}*.deb"))
    if cached:
        return cached[-1].name.split("_", 1)[0]
    raise SystemExit(f"cannot resolve which {prefix}* package {meta} depends on")


def extract_from_deb(deb, dest, members):
    """Unpack only `members` (tar wildcards such as './boot/vmlinuz-*') of `deb` into `dest`.

    A full `dpkg -x` of a kernel image writes ~400 MB of modules we never load; the stamp records
    the .deb and the member list so a change of either re-extracts.
    """
    dest = Path(dest)
    stamp = dest / ".unpacked-from"
    key = deb.name + "\n" + "\n".join(members)
    if stamp.exists() and stamp.read_text() == key:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    run(["tar", "-x", "-C", str(dest), "--wildcards", *members], stdin=tar.stdout)
    tar.stdout.close()
    if tar.wait() != 0:
        raise SystemExit(f"dpkg-deb --fsys-tarfile {deb} failed")
    stamp.write_text(key)
    return dest


if __name__ == "__main__":
    paths = ensure_base()
    for k, v in paths.items():
        print(f"{k}={v}")
