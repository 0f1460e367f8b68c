"""The ELF that boots: the guest without debug sections, or the full one when that fails."""

import os
import subprocess
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from lib import build


class BootElf(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        d = Path(self.tmp.name)
        self.full, self.boot = d / "guest", d / "guest.boot"
        self.full.write_bytes(b"\x7fELF full")
        patches = [mock.patch.object(build, "GUEST_ELF", self.full),
                   mock.patch.object(build, "BOOT_ELF", self.boot)]
        for p in patches:
            p.start()
            self.addCleanup(p.stop)

    def tearDown(self):
        self.tmp.cleanup()

    def fake_objcopy(self, returncode):
        def run(cmd, **_):
            self.assertEqual(cmd[:2], ["objcopy", "--strip-debug"])
            Path(cmd[3]).write_bytes(b"\x7fELF stripped")
            return subprocess.CompletedProcess(cmd, returncode, b"", b"")
        return run

    def test_strips_once_and_reuses_the_copy(self):
        with mock.patch.object(build.subprocess, "run", side_effect=self.fake_objcopy(0)) as run:
            self.assertEqual(build.boot_elf(), self.boot)
            self.assertEqual(self.boot.read_bytes(), b"\x7fELF stripped")
            self.assertEqual(build.boot_elf(), self.boot)
            self.assertEqual(run.call_count, 1)

    def test_a_newer_build_is_stripped_again(self):
        with mock.patch.object(build.subprocess, "run", side_effect=self.fake_objcopy(0)) as run:
            build.boot_elf()
            st = self.boot.stat()
            os.utime(self.full, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            build.boot_elf()
            self.assertEqual(run.call_count, 2)

    def test_without_objcopy_the_full_elf_boots(self):
        with mock.patch.object(build.subprocess, "run", side_effect=FileNotFoundError):
            self.assertEqual(build.boot_elf(), self.full)

    def test_a_failed_objcopy_leaves_nothing_and_the_full_elf_boots(self):
        with mock.patch.object(build.subprocess, "run", side_effect=self.fake_objcopy(1)):
            self.assertEqual(build.boot_elf(), self.full)
        self.assertEqual(sorted(p.name for p in self.full.parent.iterdir()), ["guest"])


if __name__ == "__main__":
    unittest.main()
