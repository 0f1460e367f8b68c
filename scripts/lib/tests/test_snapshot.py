"""The dom0 snapshot: its cache key, the stamp that guards the state file, the payload disk's
format (written here, read by init.sh's own shell code under busybox), and how the toolstack
monitor treats the snapshot's markers."""

import contextlib
import gzip
import io
import os
import signal
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

from lib import provision
from lib.common import HarnessError, Result, Verdict
from lib.cpio import Cpio, read_newc
from lib.harness import run_qemu
from lib.toolstack import INIT_SCRIPT, WORK, JobMonitor, snapshot

BASE = dict(qemu_id="QEMU emulator version 7.2.22 /usr/bin/qemu 123 456",
            argv=["qemu-system-x86_64", "-m", "1024", "-drive",
                  f"file={snapshot.PAYLOAD_PLACEHOLDER},format=raw"],
            digests={"xen": "a" * 64, "vmlinux": "b" * 64, "initramfs": "c" * 64},
            init_script=b"#!/bin/sh\necho hi\n", compression="zstd")


def key(**changes):
    kw = {**BASE, **changes}
    return snapshot.cache_key(kw["qemu_id"], kw["argv"], kw["digests"], kw["init_script"],
                              kw["compression"])


class CacheKey(unittest.TestCase):
    def test_same_inputs_same_key(self):
        self.assertEqual(key(), key())
        self.assertRegex(key(), r"^[0-9a-f]{64}$")

    def test_every_input_changes_the_key(self):
        changed = {
            "qemu version": key(qemu_id=BASE["qemu_id"].replace("7.2.22", "7.2.23")),
            "qemu binary": key(qemu_id=BASE["qemu_id"].replace("456", "457")),
            "memory": key(argv=[a.replace("1024", "2048") for a in BASE["argv"]]),
            "a device more": key(argv=BASE["argv"] + ["-device", "virtio-rng-pci"]),
            "argument order": key(argv=list(reversed(BASE["argv"]))),
            "xen": key(digests={**BASE["digests"], "xen": "d" * 64}),
            "vmlinux": key(digests={**BASE["digests"], "vmlinux": "d" * 64}),
            "initramfs": key(digests={**BASE["digests"], "initramfs": "d" * 64}),
            "an input more": key(digests={**BASE["digests"], "shim": "e" * 64}),
            "/init": key(init_script=BASE["init_script"] + b"# changed\n"),
            "compression": key(compression="gzip"),
        }
        for what, k in changed.items():
            self.assertNotEqual(k, key(), what)
        self.assertEqual(len(set(changed.values())), len(changed))

    def test_argument_boundaries_count(self):
        self.assertNotEqual(key(argv=["-m 1024"]), key(argv=["-m", "1024"]))
        self.assertNotEqual(key(argv=["ab", "c"]), key(argv=["a", "bc"]))

    def test_the_format_version_is_part_of_it(self):
        k = key()
        old = snapshot.FORMAT
        try:
            snapshot.FORMAT = old + 1
            self.assertNotEqual(key(), k)
        finally:
            snapshot.FORMAT = old

    def test_the_machine_uses_the_placeholder_not_the_per_run_disk(self):
        paths = {"xen": Path("/x/xen"), "vmlinux": Path("/x/vmlinux"),
                 "initramfs": Path("/x/base.cpio.gz")}
        snap = object.__new__(__import__("lib.toolstack", fromlist=["Snapshots"]).Snapshots)
        snap.paths = paths
        a = snap.machine_args("/tmp/one.img")
        b = snap.machine_args("/tmp/two.img")
        self.assertEqual([x.replace("/tmp/one.img", snapshot.PAYLOAD_PLACEHOLDER) for x in a],
                         [x.replace("/tmp/two.img", snapshot.PAYLOAD_PLACEHOLDER) for x in b])
        self.assertTrue(any("virtio-blk-pci" in x for x in a))


class StateStamp(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.key = key()
        self.state = snapshot.state_path(self.dir, self.key, "gz")
        self.state.write_bytes(gzip.compress(os.urandom(1 << 16) + b"\0" * (1 << 20)))
        provision.write_stamp(self.state, self.key)

    def tearDown(self):
        self.tmp.cleanup()

    def test_intact_state_is_ok(self):
        self.assertTrue(snapshot.state_ok(self.state, self.key))

    def test_other_key_is_not(self):
        self.assertFalse(snapshot.state_ok(self.state, key(compression="gzip")))

    def test_truncated_state_is_not(self):
        data = self.state.read_bytes()
        self.state.write_bytes(data[:len(data) // 2])
        self.assertFalse(snapshot.state_ok(self.state, self.key))

    def test_changed_bytes_are_found_by_the_hash_once_mtime_moved(self):
        data = bytearray(self.state.read_bytes())
        data[100] ^= 0xFF
        self.state.write_bytes(bytes(data))
        self.assertFalse(snapshot.state_ok(self.state, self.key))

    def test_missing_stamp_or_file(self):
        provision.stamp_path(self.state).unlink()
        self.assertFalse(snapshot.state_ok(self.state, self.key))
        self.state.unlink()
        self.assertFalse(snapshot.state_ok(self.state, self.key))

    def test_decompressor_checks_what_the_stamp_trusts(self):
        """Damage that keeps size and mtime passes the stamp's fast path; the decompressor's own
        checksum (run on every restore, and before a new state is stamped) still catches it."""
        _, _, _, gunzip = ("gzip", "gz", None, ["gzip", "-d", "-c"])
        self.assertIsNone(snapshot.check_decompresses(self.state, gunzip))
        st = self.state.stat()
        data = bytearray(self.state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        self.state.write_bytes(bytes(data))
        os.utime(self.state, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertTrue(snapshot.state_ok(self.state, self.key))
        self.assertIsNotNone(snapshot.check_decompresses(self.state, gunzip))

    def test_other_states_are_removed_with_their_stamps(self):
        old = snapshot.state_path(self.dir, key(compression="x"), "gz")
        old.write_bytes(b"old")
        provision.write_stamp(old, "x")
        snapshot.remove_other_states(self.dir, self.state)
        self.assertFalse(old.exists())
        self.assertFalse(provision.stamp_path(old).exists())
        self.assertTrue(self.state.exists())
        self.assertTrue(provision.stamp_path(self.state).exists())


def job_cpio(files):
    c = Cpio()
    c.dir("jobs")
    for name, data in files.items():
        c.file(name, data)
    return c.finish()


class PayloadFormat(unittest.TestCase):
    BODY = job_cpio({"jobs/list": b"1 j1-domu 20 120 domu\n", "jobs/guest": os.urandom(10000)})

    def test_round_trip(self):
        img = snapshot.payload_image("abc123", self.BODY)
        nonce, body = snapshot.parse_payload(img)
        self.assertEqual(nonce, "abc123")
        self.assertEqual(len(body) % snapshot.HEADER_BYTES, 0)
        self.assertEqual(body[:len(self.BODY)], self.BODY)
        self.assertEqual(body[len(self.BODY):].strip(b"\0"), b"")
        self.assertEqual([n for n, *_ in read_newc(body)], ["jobs", "jobs/list", "jobs/guest"])

    def test_header_is_one_line_in_one_block(self):
        img = snapshot.payload_image("n1", self.BODY)
        head = img[:snapshot.HEADER_BYTES]
        line, rest = head.split(b"\n", 1)
        self.assertEqual(line.split()[0], snapshot.PAYLOAD_MAGIC.encode())
        self.assertEqual(len(line.split()), 4)
        self.assertEqual(rest.strip(b"\0"), b"")

    def test_empty_disk_or_damage_is_refused(self):
        with self.assertRaises(ValueError):
            snapshot.parse_payload(b"\0" * (2 * snapshot.HEADER_BYTES))
        img = bytearray(snapshot.payload_image("n1", self.BODY))
        img[snapshot.HEADER_BYTES + 50] ^= 1
        with self.assertRaises(ValueError):
            snapshot.parse_payload(bytes(img))
        img = snapshot.payload_image("n1", self.BODY)
        with self.assertRaises(ValueError):
            snapshot.parse_payload(img[:-snapshot.HEADER_BYTES])

    def test_bad_nonce_and_oversize_are_refused(self):
        with self.assertRaises(ValueError):
            snapshot.payload_image("a b", self.BODY)
        with self.assertRaises(HarnessError):
            snapshot.payload_image("n", b"\1" * snapshot.PAYLOAD_DISK_BYTES)

    def test_disk_has_the_fixed_size(self):
        with tempfile.TemporaryDirectory() as d:
            disk = Path(d) / "p.img"
            snapshot.write_payload_disk(disk)
            self.assertEqual(disk.stat().st_size, snapshot.PAYLOAD_DISK_BYTES)
            self.assertEqual(disk.read_bytes()[:snapshot.HEADER_BYTES].strip(b"\0"), b"")
            snapshot.write_payload_disk(disk, "n2", self.BODY)
            self.assertEqual(disk.stat().st_size, snapshot.PAYLOAD_DISK_BYTES)
            self.assertEqual(snapshot.parse_payload(disk.read_bytes())[0], "n2")


def busybox():
    found = sorted(WORK.glob("pkgs/busybox-static/bin/busybox"))
    return found[0] if found else None


def init_function(name):
    lines, out = INIT_SCRIPT.read_text().splitlines(), []
    start = lines.index(f"{name}() {{")
    for line in lines[start:]:
        out.append(line)
        if line == "}":
            return "\n".join(out) + "\n"
    raise AssertionError(f"{name} does not end in init.sh")


@unittest.skipUnless(busybox(), "busybox-static not in the cache yet (scripts/run --mode domu)")
class InitReadsThePayload(unittest.TestCase):
    """init.sh's wait_payload, run by the same busybox dom0 uses, on a disk file written here."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(dir=WORK.parent)
        self.dir = Path(self.tmp.name)
        self.bin = self.dir / "bin"
        self.bin.mkdir()
        for applet in ("sh", "dd", "sha256sum", "cpio", "sleep", "cat", "rm", "mkdir"):
            os.symlink(busybox(), self.bin / applet)
        self.root = self.dir / "root"
        self.root.mkdir()

    def tearDown(self):
        self.tmp.cleanup()

    def run_init(self, disk, timeout=10):
        script = ("now() { NOW=0; }\nmark() { :; }\nfatal() { echo \"@@fatal $*\"; exit 1; }\n"
                  + init_function("wait_payload") + f'PAYLOAD="{disk}"\nwait_payload\n')
        env = {"PATH": str(self.bin), "TMPDIR": str(self.dir), "PAYLOAD_ROOT": str(self.root)}
        # Its own process group: on a timeout the polling loop's dd and sleep die with the shell,
        # so none of them writes into the folder while tearDown removes it.
        p = subprocess.Popen([str(self.bin / "sh"), "-c", script], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def test_unpacks_the_jobs_and_reports_the_nonce(self):
        guest = os.urandom(70000)
        disk = self.dir / "payload.img"
        try:
            snapshot.write_payload_disk(disk, "f00d42", job_cpio({"jobs/list": b"1 a\n",
                                                                  "jobs/guest-x": guest}))
            r = self.run_init(disk)
        except OSError as e:
            self.skipTest(f"O_DIRECT here: {e}")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("@@waiting\n", r.stdout)
        self.assertTrue(r.stdout.endswith("@@payload f00d42\n"), r.stdout)
        self.assertEqual((self.root / "jobs/guest-x").read_bytes(), guest)
        self.assertEqual((self.root / "jobs/list").read_text(), "1 a\n")

    def test_a_body_that_does_not_match_its_header_is_fatal(self):
        disk = self.dir / "payload.img"
        img = bytearray(snapshot.payload_image("n1", job_cpio({"jobs/list": b"x\n"})))
        img[snapshot.HEADER_BYTES + 10] ^= 1
        with open(disk, "wb") as f:
            f.write(img)
            f.truncate(snapshot.PAYLOAD_DISK_BYTES)
        r = self.run_init(disk, timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertIn("@@fatal payload body does not match its header", r.stdout)
        self.assertFalse((self.root / "jobs").exists())

    def test_an_empty_disk_keeps_it_waiting(self):
        disk = self.dir / "payload.img"
        snapshot.write_payload_disk(disk)
        with self.assertRaises(subprocess.TimeoutExpired):
            self.run_init(disk, timeout=1.5)


class Markers(unittest.TestCase):
    def feed(self, mon, lines):
        return [mon.feed(line) for line in lines]

    def test_waiting_calls_the_snapshot_hook(self):
        calls = []
        mon = JobMonitor(["a"], echo=False, on_waiting=lambda: calls.append(1), nonce="n1")
        self.assertEqual(self.feed(mon, ["@@ready 8.0", "@@waiting", "@@payload n1"]),
                         [None, None, None])
        self.assertEqual(calls, [1])

    def test_waiting_without_a_hook_is_a_crash(self):
        mon = JobMonitor(["a"], echo=False)
        self.assertEqual(mon.feed("@@waiting"), Verdict.CRASH)

    def test_someone_elses_payload_is_a_crash(self):
        mon = JobMonitor(["a"], echo=False, nonce="mine")
        self.assertEqual(mon.feed("@@payload theirs"), Verdict.CRASH)
        self.assertIn("theirs", mon.finish(Result(Verdict.CRASH, 1.0))["a"].tail())

    def test_the_last_jobs_result_line_ends_the_run_after_a_grace(self):
        mon = JobMonitor(["a", "b"], echo=False)
        ends = self.feed(mon, ["@@start a", "[a] Test result: SUCCESS"])
        self.assertEqual(ends, [None, None])  # not the last job: dom0 decides
        self.feed(mon, ["@@job a SUCCESS 1.0", "@@start b", "[b] hello"])
        end = mon.feed("[b] Test result: FAILURE")
        self.assertEqual(end[0], Verdict.SUCCESS)
        self.assertGreater(end[1], 0)
        mon.feed("[b] trailing line")
        mon.feed("@@job b CRASH 3.0")  # too late: the result line decided
        r = mon.finish(Result(Verdict.SUCCESS, 5.0))
        self.assertEqual(r["a"].verdict, Verdict.SUCCESS)
        self.assertEqual(r["b"].verdict, Verdict.FAILURE)
        self.assertIn("trailing line", r["b"].lines)

    def test_phases_are_recorded(self):
        mon = JobMonitor(["a"], echo=False)
        self.feed(mon, ["@@t header 1234", "@@t read 1250", "@@t bogus x"])
        self.assertEqual(mon.phases, [("header", 12.34), ("read", 12.5)])


class JudgeGrace(unittest.TestCase):
    def test_tuple_verdict_sets_its_own_grace_and_lines_after_it_are_judged(self):
        seen = []

        def judge(line):
            seen.append(line)
            return (Verdict.SUCCESS, 2.0) if line == "go" else None

        r = run_qemu(["sh", "-c", "echo go; sleep 0.1; echo after; sleep 30"], timeout=20,
                     echo=False, judge=judge, grace=0.0)
        self.assertEqual(r.verdict, Verdict.SUCCESS)
        self.assertEqual(seen, ["go", "after"])


if __name__ == "__main__":
    unittest.main()
