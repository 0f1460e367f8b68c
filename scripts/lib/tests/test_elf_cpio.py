"""The ELF reader (DT_NEEDED) and the newc cpio writer."""

import struct
import unittest
from pathlib import Path

from lib.cpio import Cpio, read_newc
from lib.elf import elf_needed


def dynamic_elf(libs):
    """A minimal 64-bit LE ELF: one PT_LOAD over the whole file, one PT_DYNAMIC with DT_NEEDED
    entries for `libs` and a DT_STRTAB."""
    base = 0x400000
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in libs)
    offs, o = [], 1
    for n in libs:
        offs.append(o)
        o += len(n) + 1
    phoff, phnum = 64, 2
    strtab_off = phoff + 56 * phnum
    dyn_off = strtab_off + len(strtab) + (-len(strtab) % 8)
    dyn = b"".join(struct.pack("<qQ", 1, v) for v in offs)
    dyn += struct.pack("<qQ", 5, base + strtab_off) + struct.pack("<qQ", 0, 0)
    size = dyn_off + len(dyn)
    ehdr = (b"\x7fELF\x02\x01\x01" + b"\0" * 9
            + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, 0, 0, 64, 56, phnum, 64, 0, 0))
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    dynamic = struct.pack("<IIQQQQQQ", 2, 6, dyn_off, base + dyn_off, base + dyn_off, len(dyn),
                          len(dyn), 8)
    data = ehdr + load + dynamic + strtab
    data += b"\0" * (dyn_off - len(data)) + dyn
    return data


class ElfNeeded(unittest.TestCase):
    def test_lists_needed_libraries_in_order(self):
        self.assertEqual(elf_needed(dynamic_elf(["libxl.so.4.17", "libc.so.6"])),
                         ["libxl.so.4.17", "libc.so.6"])

    def test_not_an_elf_needs_nothing(self):
        self.assertEqual(elf_needed(b"#!/bin/sh\necho hi\n"), [])
        self.assertEqual(elf_needed(b""), [])

    def test_32_bit_or_big_endian_is_not_read(self):
        data = bytearray(dynamic_elf(["libc.so.6"]))
        data[4] = 1
        self.assertEqual(elf_needed(bytes(data)), [])

    def test_truncated_elf_is_a_value_error(self):
        data = dynamic_elf(["libc.so.6"])
        for cut in (0x30, 100, len(data) - 20):
            with self.subTest(cut=cut), self.assertRaises(ValueError):
                elf_needed(data[:cut])

    def test_a_real_binary(self):
        ls = Path("/bin/ls").read_bytes()
        self.assertIn("libc.so.6", elf_needed(ls))


class CpioWriter(unittest.TestCase):
    def test_round_trip_with_parents_first_and_alignment(self):
        c = Cpio()
        c.file("usr/lib/xen/bin/xl", b"x" * 5, 0o755)
        c.symlink("bin/sh", "busybox")
        c.chardev("dev/console", 5, 1)
        c.file("init", b"#!/bin/sh\n", 0o755)
        data = c.finish()
        self.assertEqual(len(data) % 512, 0)
        entries = read_newc(data)
        names = [e[0] for e in entries]
        self.assertEqual(names, ["usr", "usr/lib", "usr/lib/xen", "usr/lib/xen/bin",
                                 "usr/lib/xen/bin/xl", "bin", "bin/sh", "dev", "dev/console",
                                 "init"])
        by = {e[0]: e for e in entries}
        self.assertEqual(by["usr/lib/xen/bin/xl"][1], 0o100755)
        self.assertEqual(by["usr/lib/xen/bin/xl"][2], b"xxxxx")
        self.assertEqual(by["bin/sh"][1], 0o120777)
        self.assertEqual(by["bin/sh"][2], b"busybox")
        self.assertEqual(by["dev/console"][3], (5, 1))
        self.assertEqual(by["usr"][1], 0o40755)

    def test_every_header_is_4_byte_aligned(self):
        c = Cpio()
        for n in range(1, 9):  # names and data of every length mod 4
            c.file("d/" + "n" * n, b"y" * n)
        data = c.finish()
        off = 0
        for _ in range(10):
            self.assertEqual(data[off:off + 6], b"070701", f"header at {off}")
            self.assertEqual(off % 4, 0)
            namesize = int(data[off + 94:off + 102], 16)
            filesize = int(data[off + 54:off + 62], 16)
            off += 110 + namesize
            off += -off % 4
            off += filesize + (-filesize % 4)
        self.assertEqual(len(read_newc(data)), 9)

    def test_directories_are_written_once(self):
        c = Cpio()
        c.file("a/b/one", b"1")
        c.file("a/b/two", b"2")
        c.dir("a/b")
        names = [e[0] for e in read_newc(c.finish())]
        self.assertEqual(names.count("a/b"), 1)
        self.assertEqual(names.count("a"), 1)


if __name__ == "__main__":
    unittest.main()
