"""The cache: downloads checked against apt's SHA256, stamped build products, damaged files
fetched or built again with one line, and two first runs at once on an empty cache."""

import contextlib
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from lib import provision
from lib.common import HarnessError
from lib.provision import AptRecord, fetch_debs, make_artifact, parse_apt_show, stamp_ok

SCRIPTS = Path(__file__).resolve().parents[2]


PAYLOAD = bytes(range(256)) * 4096 + b"xen image\n"  # 1 MiB: big enough for the races to show


def make_deb(workdir, payload=PAYLOAD):
    """A real .deb (dpkg-deb --build) holding boot/payload."""
    root = Path(workdir) / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "boot" / "payload").write_bytes(payload)
    (root / "DEBIAN" / "control").write_text(
        "Package: fakepkg\nVersion: 1:1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    deb = Path(workdir) / "fake.deb"
    subprocess.run(["dpkg-deb", "--build", "-Znone", str(root), str(deb)], check=True,
                   stdout=subprocess.DEVNULL)
    return deb


class FakeApt:
    def __init__(self, data, served=None):
        self.data, self.served = data, served if served is not None else data
        self.rec = AptRecord("fakepkg", "1:1.0", "all", len(data),
                             hashlib.sha256(data).hexdigest())
        self.index_calls = self.downloads = 0

    def index(self, packages):
        self.index_calls += 1
        return {"fakepkg": self.rec}

    def download(self, records, dest):
        self.downloads += 1
        (Path(dest) / self.rec.deb_name).write_bytes(self.served)


def quiet():
    return contextlib.redirect_stderr(io.StringIO())


class Downloads(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.debs = Path(self.tmp.name) / "debs"
        self.apt = FakeApt(os.urandom(5000))

    def tearDown(self):
        self.tmp.cleanup()

    def fetch(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            got = fetch_debs(["fakepkg"], self.debs, self.apt.index, self.apt.download)
        return got["fakepkg"], err.getvalue()

    def test_download_once_then_warm_without_apt(self):
        path, msg = self.fetch()
        self.assertEqual(path.name, "fakepkg_1%3a1.0_all.deb")
        self.assertIn("downloaded fakepkg (0.0 MiB)", msg)
        path, msg = self.fetch()
        self.assertEqual((self.apt.index_calls, self.apt.downloads), (1, 1))
        self.assertEqual(msg, "")

    def test_truncated_download_from_an_earlier_run_is_fetched_again(self):
        self.debs.mkdir()
        (self.debs / self.apt.rec.deb_name).write_bytes(self.apt.data[:1000])
        path, msg = self.fetch()
        self.assertEqual(path.read_bytes(), self.apt.data)
        self.assertIn("is damaged (1000 of 5000 bytes): downloading it again", msg)
        self.assertEqual(len(msg.strip().splitlines()), 2)  # damaged + downloaded

    def test_verified_deb_truncated_later_is_fetched_again(self):
        path, _ = self.fetch()
        with open(path, "r+b") as f:
            f.truncate(100)
        path, msg = self.fetch()
        self.assertEqual(path.read_bytes(), self.apt.data)
        self.assertIn("damaged (100 of 5000 bytes)", msg)

    def test_same_size_different_bytes(self):
        path, _ = self.fetch()
        path.write_bytes(b"\0" * 5000)
        path, msg = self.fetch()
        self.assertEqual(path.read_bytes(), self.apt.data)
        self.assertIn("SHA256 does not match", msg)

    def test_a_bad_download_is_an_error_not_a_cached_file(self):
        self.apt.served = self.apt.data[:10]
        with quiet(), self.assertRaises(HarnessError) as cm:
            self.fetch()
        self.assertIn("SHA256", str(cm.exception))
        self.assertEqual(list(self.debs.glob("*.deb")), [])

    def test_apt_show_parser(self):
        text = ("Package: zlib1g\nVersion: 1:1.2.13.dfsg-1\nArchitecture: amd64\nSize: 86684\n"
                "SHA256: d7dd\nDescription: x\n more\n\nPackage: other\nVersion: 1\n")
        recs = parse_apt_show(text)
        self.assertEqual(list(recs), ["zlib1g"])
        self.assertEqual(recs["zlib1g"].deb_name, "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb")
        self.assertEqual(recs["zlib1g"].size, 86684)


class Artifacts(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "xen.elf"
        self.builds = 0

    def tearDown(self):
        self.tmp.cleanup()

    def make(self, tmp):
        self.builds += 1
        Path(tmp).write_bytes(b"ELF" * 10000)

    def build(self, key="k"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            built = make_artifact(self.path, self.make, "the Xen image", key)
        return built, err.getvalue()

    def test_built_once(self):
        self.assertEqual(self.build(), (True, ""))
        self.assertEqual(self.build(), (False, ""))
        self.assertTrue(stamp_ok(self.path, "k"))

    def test_truncated_product_is_rebuilt_with_one_line(self):
        self.build()
        with open(self.path, "r+b") as f:
            f.truncate(1000)
        built, msg = self.build()
        self.assertTrue(built)
        self.assertEqual(self.path.stat().st_size, 30000)
        self.assertIn("is damaged (1000 of 30000 bytes): rebuilding the Xen image", msg)
        self.assertEqual(len(msg.strip().splitlines()), 1)

    def test_touched_but_intact_is_kept(self):
        self.build()
        os.utime(self.path, (1, 1))
        self.assertEqual(self.build(), (False, ""))

    def test_other_inputs_rebuild(self):
        self.build("a")
        self.assertTrue(self.build("b")[0])

    def test_product_without_stamp_is_rebuilt(self):
        self.path.write_bytes(b"half")
        self.assertTrue(self.build()[0])
        self.assertEqual(self.path.stat().st_size, 30000)

    def test_truncated_gzip_is_an_error(self):
        gz = Path(self.tmp.name) / "x.gz"
        gz.write_bytes(gzip.compress(os.urandom(100000))[:5000])
        with self.assertRaises(HarnessError):
            provision.gunzip_to(gz, Path(self.tmp.name) / "out")


CHILD = r"""
import hashlib, sys, time
from pathlib import Path
from lib import provision
from lib.provision import AptRecord
data = Path(sys.argv[1]).read_bytes()
rec = AptRecord("fakepkg", "1:1.0", "all", len(data), hashlib.sha256(data).hexdigest())
def download(records, dest):
    with open(Path(dest) / rec.deb_name, "wb") as f:   # like apt: in place, in pieces
        for i in range(0, len(data), 4096):
            f.write(data[i:i + 4096]); f.flush(); time.sleep(0.0005)
with provision.cache_lock():
    debs = provision.fetch_debs(["fakepkg"], index=lambda p: {"fakepkg": rec}, download=download)
    tree, = provision.unpack_debs([(debs["fakepkg"], provision.CACHE / "xen" / "hv")])
    assert (tree / "boot" / "payload").read_bytes().endswith(b"xen image\n")
print("ok")
"""


class Concurrency(unittest.TestCase):
    def test_two_first_runs_at_once_on_an_empty_cache(self):
        with tempfile.TemporaryDirectory() as d:
            deb = make_deb(d)
            for round_ in range(3):
                env = dict(os.environ, XENPV_CACHE=str(Path(d) / f"cache{round_}"))
                procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(deb)], cwd=SCRIPTS,
                                          env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True) for _ in range(2)]
                for p in procs:
                    out, err = p.communicate(timeout=60)
                    self.assertEqual((p.returncode, out.strip()), (0, "ok"), err)


if __name__ == "__main__":
    unittest.main()
