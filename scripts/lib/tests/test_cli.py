"""The commands refuse bad input before building, downloading or booting anything: cargo,
apt-get and qemu are replaced by stubs that record being called, and the cache is a scratch one."""

import os
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2]
STUBS = ["cargo", "apt-get", "apt-cache", "rustup", "qemu-system-x86_64", "dpkg"]


class Commands(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        d = Path(self.tmp.name)
        self.cache = d / "cache"
        self.calls = d / "calls"
        (d / "bin").mkdir()
        for s in STUBS:
            stub = d / "bin" / s
            stub.write_text(f"#!/bin/sh\necho {s} >> {self.calls}\nexit 1\n")
            stub.chmod(0o755)
        self.env = dict(os.environ, XENPV_CACHE=str(self.cache),
                        PATH=f"{d / 'bin'}:{os.environ['PATH']}")

    def tearDown(self):
        self.tmp.cleanup()

    def run_cmd(self, *argv, timeout=20):
        t = time.monotonic()
        r = subprocess.run([str(SCRIPTS / argv[0]), *argv[1:]], capture_output=True, text=True,
                           env=self.env, timeout=timeout, stdin=subprocess.DEVNULL)
        r.seconds = time.monotonic() - t
        return r

    def assertRefused(self, r, *needles, code=2, allowed=()):
        msg = f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
        self.assertEqual(r.returncode, code, msg)
        self.assertNotIn("Traceback", r.stderr + r.stdout, msg)
        for n in needles:
            self.assertIn(n, r.stderr + r.stdout, msg)
        ran = self.calls.read_text().split() if self.calls.exists() else []
        self.assertEqual([c for c in ran if c not in allowed], [], "ran other programs")
        self.assertFalse((self.cache / "debs").exists(), "downloaded something")

    def test_bad_timeouts(self):
        for cmd in ("run", "bench"):
            for bad in ("nan", "inf", "1e400", "0", "-1", "soon"):
                with self.subTest(cmd=cmd, timeout=bad):
                    self.assertRefused(self.run_cmd(cmd, "--timeout", bad),
                                       "--timeout", repr(bad))
        self.assertRefused(self.run_cmd("run", "--silence", "nan"), "--silence")

    def test_too_long_options(self):
        r = self.run_cmd("run", "--mode", "shim", "--", "y" * 5000)
        self.assertRefused(r, "5000 bytes", "at most 1022")
        r = self.run_cmd("run", "--", "stress", "ops=4000", "depth=8", " " * 1000, "seed=7654321")
        self.assertRefused(r, "at most 1022")

    def test_control_characters(self):
        for mode in ("dom0", "domu", "shim"):
            with self.subTest(mode=mode):
                self.assertRefused(self.run_cmd("run", "--mode", mode, "--", "tests=a\nb"),
                                   "control characters")

    def test_stray_word_suggests_double_dash(self):
        self.assertRefused(self.run_cmd("run", "list"), "scripts/run -- list")

    def test_run_help_once_with_guest_options(self):
        r = self.run_cmd("run", "--help")
        self.assertEqual(r.returncode, 0)
        self.assertEqual(r.stdout.count("usage:"), 1)
        for text in ("tests=a,b", "stress seed=N", "--timeout", "--silence", "--quiet",
                     "--memory", "--smp", "XENPV_ACCEL", "XENPV_CACHE", "1022 bytes"):
            self.assertIn(text, r.stdout)

    def test_test_help_and_unknown_arguments(self):
        r = self.run_cmd("test", "--help")
        self.assertEqual(r.returncode, 0)
        self.assertEqual(r.stdout.count("usage:"), 1)
        self.assertIn("--quick", r.stdout)
        self.assertFalse(self.calls.exists())
        for bad in (["--bogus"], ["quick"], ["-x"]):
            with self.subTest(bad=bad):
                self.assertRefused(self.run_cmd("test", *bad), "usage:")

    def test_bench_help_and_reps(self):
        r = self.run_cmd("bench", "--help")
        self.assertEqual(r.returncode, 0)
        for flag, words in (("--mode", "how the guest boots"), ("--reps", "repetitions"),
                            ("--out", "bench.csv"), ("--timeout", "seconds"),
                            ("--silence", "HANG")):
            self.assertIn(flag, r.stdout)
            self.assertIn(words, r.stdout)
        for bad in ("0", "-1", "1001", "many"):
            with self.subTest(reps=bad):
                self.assertRefused(self.run_cmd("bench", "--reps", bad), "--reps")

    def test_kvm_xen_probes_before_building_or_downloading(self):
        r = self.run_cmd("run", "--mode", "kvm-xen")
        if r.returncode == 0:
            self.skipTest("this host can run qemu's Xen emulation")
        # The probe itself asks qemu for its version; nothing else may run.
        self.assertRefused(r, "kvm-xen: not available on this host", "== kvm-xen: SKIP",
                           code=1, allowed=("qemu-system-x86_64",))
        self.assertLess(r.seconds, 10)


if __name__ == "__main__":
    unittest.main()
