"""Guest options, timeouts and counts; how options reach xl and qemu; the command lines."""

import argparse
import unittest

from lib import machine
from lib.common import UsageError
from lib.options import (LIMITS, XEN_CMDLINE_MAX, bounded_int, check_guest_options,
                         positive_int, positive_seconds)
from lib.toolstack import Job, xl_config, xl_string


def xl_dequote(literal):
    """xl's reading of a double-quoted config string (libxlu_cfg.c, xlu__cfgl_dequote):
    backslash escapes \\" \\' \\\\ \\n \\r \\t; a raw newline or an unescaped quote ends it."""
    assert literal[0] == literal[-1] == '"'
    body, out, i = literal[1:-1], [], 0
    while i < len(body):
        c = body[i]
        if c == '"' or c == "\n":
            raise ValueError("string ends early")
        if c == "\\":
            i += 1
            c = {"n": "\n", "r": "\r", "t": "\t"}.get(body[i], body[i])
        out.append(c)
        i += 1
    return "".join(out)


class GuestOptions(unittest.TestCase):
    def test_limit_is_below_what_xen_keeps(self):
        for mode in ("dom0", "domu", "shim"):
            self.assertEqual(LIMITS[mode], XEN_CMDLINE_MAX - 1)
            self.assertEqual(check_guest_options(["x" * LIMITS[mode]], [mode]),
                             "x" * LIMITS[mode])
            with self.assertRaises(UsageError) as cm:
                check_guest_options(["x" * (LIMITS[mode] + 1)], [mode])
            self.assertIn(f"at most {LIMITS[mode]}", str(cm.exception))
            self.assertIn(mode, str(cm.exception))

    def test_the_issue_example_is_refused(self):
        words = ["stress", "ops=4000", "depth=8"] + [""] * 1100 + ["seed=7654321"]
        with self.assertRaises(UsageError):
            check_guest_options(words, ["dom0"])

    def test_five_thousand_bytes_under_the_shim(self):
        with self.assertRaises(UsageError) as cm:
            check_guest_options(["y" * 5000], ["shim"])
        self.assertEqual(cm.exception.exit_code, 2)

    def test_length_counts_utf8_bytes(self):
        n = LIMITS["dom0"] // 2
        check_guest_options(["é" * n], ["dom0"])
        with self.assertRaises(UsageError):
            check_guest_options(["é" * (n + 1)], ["dom0"])

    def test_the_strictest_mode_decides(self):
        text = ["x" * (LIMITS["kvm-xen"] + 1)]
        check_guest_options(text, ["dom0", "domu", "shim"])
        with self.assertRaises(UsageError):
            check_guest_options(text, ["dom0", "kvm-xen"])

    def test_control_characters_are_refused_in_every_mode(self):
        for mode in LIMITS:
            for bad in ("a\nb", "a\tb", "a\rb", "a\x7fb", "a\x00b"):
                with self.subTest(mode=mode, bad=bad), self.assertRaises(UsageError):
                    check_guest_options([bad], [mode])

    def test_quotes_and_backslashes_pass(self):
        for mode in LIMITS:
            self.assertEqual(check_guest_options(["tests=a\\b\"c'd"], [mode]), "tests=a\\b\"c'd")

    def test_words_are_joined_with_spaces(self):
        self.assertEqual(check_guest_options(["stress", "seed=1"], ["dom0"]), "stress seed=1")
        self.assertEqual(check_guest_options([], ["dom0"]), "")


class XlConfig(unittest.TestCase):
    def test_strings_reach_xl_unchanged(self):
        for s in ["", "plain", 'a"b', "a'b", "a\\b", "\\\"'\\'", "tests=a\\b\"c'd", "é ü"]:
            with self.subTest(s=s):
                self.assertEqual(xl_dequote(xl_string(s)), s)

    def test_config_holds_the_escaped_extra(self):
        cfg = xl_config(Job("q", "shim", "/g", 'x"y\\z', memory_mb=1024, vcpus=2), "j1-q",
                        "/jobs/g")
        self.assertIn('extra = "x\\"y\\\\z"', cfg)
        self.assertIn("memory = 1024", cfg)
        self.assertIn("vcpus = 2", cfg)
        self.assertIn("pvshim = 1", cfg)


class Numbers(unittest.TestCase):
    def test_seconds(self):
        self.assertEqual(positive_seconds("0.5"), 0.5)
        self.assertEqual(positive_seconds("120"), 120.0)
        for bad in ("nan", "NaN", "inf", "-inf", "1e400", "0", "-1", "0.0", "abc", ""):
            with self.subTest(bad=bad), self.assertRaises(argparse.ArgumentTypeError):
                positive_seconds(bad)

    def test_counts(self):
        self.assertEqual(positive_int("3"), 3)
        for bad in ("0", "-2", "1.5", "x"):
            with self.subTest(bad=bad), self.assertRaises(argparse.ArgumentTypeError):
                positive_int(bad)
        reps = bounded_int(1, 1000)
        self.assertEqual(reps("1000"), 1000)
        for bad in ("0", "1001"):
            with self.assertRaises(argparse.ArgumentTypeError):
                reps(bad)


class CommandLines(unittest.TestCase):
    def test_xen_command_line(self):
        self.assertIn("dom0_mem=96M,max:96M", machine.xen_cmdline(96))
        self.assertNotIn("dom0_mem", machine.xen_cmdline(None, 2))
        self.assertIn("dom0_max_vcpus=2", machine.xen_cmdline(None, 2))

    def test_commas_in_module_command_lines_are_doubled(self):
        self.assertEqual(machine.multiboot_modules([("/g", "tests=a,b"), ("/i", "")]),
                         "/g tests=a,,b,/i")

    def test_dom0_default_and_with_memory(self):
        args = machine.dom0_guest("/xen", "/guest", "list")
        self.assertEqual(args[args.index("-m") + 1], "512")
        self.assertIn("dom0_mem=96M,max:96M", args[args.index("-append") + 1])
        self.assertEqual(args[args.index("-initrd") + 1], "/guest list")
        args = machine.dom0_guest("/xen", "/guest", "", memory_mb=4096, smp=2)
        self.assertEqual(args[args.index("-m") + 1], "4096")
        self.assertEqual(args[args.index("-smp") + 1], "2")
        xen = args[args.index("-append") + 1]
        self.assertNotIn("dom0_mem", xen)
        self.assertIn("dom0_max_vcpus=2", xen)


if __name__ == "__main__":
    unittest.main()
