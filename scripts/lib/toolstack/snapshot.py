"""A booted toolstack dom0, saved once and restored by every later run.

Booting Xen and the Linux dom0 under TCG takes ~10 s before `xl create` can run. The first run
boots as always, but with a payload disk attached and no jobs in its initramfs: init.sh starts the
toolstack, prints `@@waiting` and polls the disk. The harness then stops the machine, migrates it
to a compressed file in the cache (the *state*), writes the jobs to the payload disk and lets the
machine continue. Later runs start qemu with the same command line plus `-incoming`, write their
own payload disk before qemu starts, and send QMP `cont`: dom0 finds the payload on its next poll
and runs the jobs exactly like a cold boot.

The state is named after a key over everything it depends on (qemu's build and command line,
Xen, vmlinux, the initramfs and its /init, this format); any change is a miss that rebuilds it.
It carries a stamp (SHA256, size, mtime, key) written only after the file was checked to
decompress: a truncated or damaged file is rebuilt, never restored.

Payload disk (raw, PAYLOAD_DISK_BYTES, sparse): a HEADER_BYTES header block
    "XENPVPAYLOAD1 <nonce> <body length> <body sha256>\\n", zero-padded
then the body, a newc cpio (the job archive) zero-padded to whole blocks, extracted at / by dom0
once its SHA256 matches. The nonce is random per run; dom0 echoes it (@@payload).
dom0 reads it with `dd iflag=direct`, so its page cache never serves a stale block.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .. import provision
from ..common import HarnessError

# Bump when the way a state is taken or used changes in a way the key does not show.
FORMAT = 1
PAYLOAD_MAGIC = "XENPVPAYLOAD1"
HEADER_BYTES = 4096
PAYLOAD_DISK_BYTES = 64 << 20
PAYLOAD_PLACEHOLDER = "@PAYLOAD@"
# 1 TiB/s: the default 32 MiB/s makes saving a 1 GiB machine take seconds.
MAX_BANDWIDTH = 1 << 40


# ---------------------------------------------------------------------------------------------
# Compression: zstd when the host has it (~5x smaller than raw, as fast), else gzip.


def compressor():
    """(name, file extension, compress command, decompress command): commands read stdin and
    write stdout."""
    if shutil.which("zstd"):
        return "zstd", "zst", ["zstd", "-1", "-q", "-c"], ["zstd", "-d", "-q", "-c"]
    return "gzip", "gz", ["gzip", "-1", "-c"], ["gzip", "-d", "-c"]


# ---------------------------------------------------------------------------------------------
# The key


def qemu_identity(qemu="qemu-system-x86_64"):
    """qemu's version line plus the binary's size and mtime: a rebuilt or upgraded qemu is a
    different machine as far as its migration format goes."""
    path = shutil.which(qemu)
    if not path:
        raise HarnessError(f"{qemu} not found")
    st = os.stat(path)
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=20).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "?"
    return f"{version} {os.path.realpath(path)} {st.st_size} {st.st_mtime_ns}"


def cache_key(qemu_id, argv, digests, init_script, compression):
    """The state's key: a SHA256 over this format, qemu's identity, its command line (the payload
    disk's per-run path replaced by PAYLOAD_PLACEHOLDER), the SHA256 of each input file by role
    ({"xen": ..., "vmlinux": ..., "initramfs": ...}), the dom0's /init and the compression."""
    h = hashlib.sha256()

    def part(label, value):
        data = value if isinstance(value, bytes) else str(value).encode()
        h.update(f"{label} {len(data)}\n".encode() + data + b"\n")

    part("format", FORMAT)
    part("qemu", qemu_id)
    part("argc", len(argv))
    for a in argv:
        part("arg", a)
    for role in sorted(digests):
        part(f"file {role}", digests[role])
    part("init", init_script)
    part("compression", compression)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The payload disk


def payload_header(nonce, body):
    """The header block for `body` (already padded to whole blocks)."""
    if not nonce.isalnum():
        raise ValueError(f"nonce {nonce!r}: letters and digits only")
    line = (f"{PAYLOAD_MAGIC} {nonce} {len(body)} "
            f"{hashlib.sha256(body).hexdigest()}\n").encode()
    return line + b"\0" * (HEADER_BYTES - len(line))


def payload_image(nonce, body):
    """The payload disk's bytes up to the end of the body (the rest of the disk is zeros). The
    body is padded with zeros to whole HEADER_BYTES blocks (dom0 reads it with O_DIRECT; a cpio
    archive ends at its trailer, so the padding is harmless)."""
    body = bytes(body) + b"\0" * (-len(body) % HEADER_BYTES)
    if HEADER_BYTES + len(body) > PAYLOAD_DISK_BYTES:
        raise HarnessError(f"the jobs ({len(body)} bytes) do not fit the "
                           f"{PAYLOAD_DISK_BYTES >> 20} MiB payload disk")
    return payload_header(nonce, body) + body


def write_payload_disk(path, nonce=None, body=None):
    """Write the payload disk at `path`: PAYLOAD_DISK_BYTES, sparse; without a body, an empty
    disk (zeros: dom0 keeps waiting)."""
    with open(path, "wb") as f:
        if body is not None:
            f.write(payload_image(nonce, body))
        f.truncate(PAYLOAD_DISK_BYTES)


def parse_payload(data):
    """(nonce, padded body) from the payload disk's bytes, as init.sh reads them; ValueError if
    the header is missing or the body does not match it."""
    head = data[:HEADER_BYTES]
    line = head.split(b"\n", 1)[0]
    words = line.decode(errors="replace").split()
    if len(words) != 4 or words[0] != PAYLOAD_MAGIC or b"\n" not in head:
        raise ValueError("no payload header")
    nonce, length, digest = words[1], words[2], words[3]
    if not length.isdigit() or int(length) % HEADER_BYTES:
        raise ValueError(f"bad payload length {length!r}")
    body = data[HEADER_BYTES:HEADER_BYTES + int(length)]
    if len(body) != int(length) or hashlib.sha256(body).hexdigest() != digest:
        raise ValueError("payload body does not match its header")
    return nonce, body


def payload_drive_args(path):
    return ["-drive", f"file={path},format=raw,if=none,id=payload",
            "-device", "virtio-blk-pci,drive=payload"]


# ---------------------------------------------------------------------------------------------
# The state file


def state_path(directory, key, ext):
    return Path(directory) / f"state-{key[:20]}.{ext}"


def state_ok(path, key):
    """True if `path` is the state its stamp describes, taken for `key`. Size and mtime are
    checked on every use; the full SHA256 again whenever either changed."""
    return provision.stamp_ok(path, key)


def check_decompresses(path, decompress):
    """Run the decompressor over `path` (its own checksum, e.g. zstd's or gzip's CRC, must
    match); returns an error message or None."""
    with open(path, "rb") as f:
        r = subprocess.run(decompress, stdin=f, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    if r.returncode != 0:
        return r.stderr.decode(errors="replace").strip() or f"exit {r.returncode}"
    return None


def remove_state(path):
    Path(path).unlink(missing_ok=True)
    provision.stamp_path(path).unlink(missing_ok=True)


def remove_other_states(directory, keep):
    for old in Path(directory).glob("state-*"):
        if old.name.endswith(".ok"):
            continue
        if old != keep:
            remove_state(old)
