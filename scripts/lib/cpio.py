"""newc ("070701") cpio archives, as Linux unpacks them for an initramfs."""

import io

NEWC_MAGIC = "070701"
HEADER_SIZE = 110


class Cpio:
    """An archive built in memory; entries keep insertion order, so directories go in before
    their contents (the kernel's unpacker does not create parents)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = NEWC_MAGIC + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(HEADER_SIZE + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, path):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, 0o40755)

    def _parent(self, path):
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        self._parent(path)
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path, target):
        path = path.strip("/")
        self._parent(path)
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path, major, minor):
        path = path.strip("/")
        self._parent(path)
        self._entry(path, 0o20600, rdev=(major, minor))

    def finish(self):
        """The archive: a TRAILER!!! entry, padded to 512 bytes."""
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def read_newc(data):
    """[(name, mode, data, (rdevmajor, rdevminor))] of a newc archive, up to its trailer (for the
    tests and for checking an archive)."""
    out, off = [], 0
    while True:
        hdr = data[off:off + HEADER_SIZE]
        if len(hdr) < HEADER_SIZE or hdr[:6] != NEWC_MAGIC.encode():
            raise ValueError(f"no newc header at offset {off}")
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name_end = off + HEADER_SIZE + namesize
        name = data[off + HEADER_SIZE:name_end - 1].decode()
        start = name_end + (-(HEADER_SIZE + namesize) % 4)
        body = data[start:start + filesize]
        if len(body) != filesize:
            raise ValueError(f"{name}: truncated data")
        off = start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, body, (rmaj, rmin)))
