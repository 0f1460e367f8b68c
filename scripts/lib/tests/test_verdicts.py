"""Result lines, crash lines, the toolstack's @@ markers, and how a boot ends (early on a verdict,
HANG on silence, TIMEOUT, EXITED), with a shell script standing in for qemu."""

import io
import re
import time
import unittest

from lib.common import GUEST_VERDICTS, RESULT_RE, Result, Verdict, parse_result_line
from lib.harness import judge_line, run_qemu
from lib.toolstack import INIT_SCRIPT, JobMonitor, init_env


class ResultLines(unittest.TestCase):
    def test_each_guest_verdict(self):
        for v in GUEST_VERDICTS:
            self.assertEqual(parse_result_line(f"(d1) Test result: {v.value}"), v)
        self.assertIsNone(parse_result_line("Test result: MAYBE"))
        self.assertIsNone(parse_result_line("no result here"))

    def test_crash_lines(self):
        self.assertEqual(judge_line("(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds."),
                         Verdict.CRASH)
        self.assertEqual(judge_line("(XEN) d0v0 Unhandled: vec 14, #PF[0001]"), Verdict.CRASH)
        self.assertIsNone(judge_line("(XEN) Xen version 4.17.7"))
        self.assertEqual(judge_line("Test result: FAILURE"), Verdict.FAILURE)

    def test_verdicts_are_strings_and_know_their_source(self):
        self.assertEqual(f"{Verdict.HANG}", "HANG")
        self.assertTrue(Verdict.SKIP.from_guest)
        self.assertFalse(Verdict.CRASH.from_guest)

    def test_init_sh_takes_its_verdict_names_from_python(self):
        env = init_env()
        self.assertIn("V_HANG=HANG", env)
        self.assertIn("V_TIMEOUT=TIMEOUT", env)
        self.assertIn("V_CRASH=CRASH", env)
        pattern = re.search(r"RESULT_RE='([^']*)'", env).group(1)
        self.assertEqual(pattern, "Test result: (SUCCESS|FAILURE|ERROR|SKIP)")
        self.assertEqual(re.compile(pattern).pattern.replace(" ", r"\ "), RESULT_RE.pattern)
        script = INIT_SCRIPT.read_text()
        for word in ("SUCCESS", "FAILURE", "TIMEOUT", "CRASH", "HANG"):
            self.assertNotRegex(script, rf"(?m)^[^#]*\b{word}\b", f"{word} spelled in init.sh")


class Markers(unittest.TestCase):
    def feed(self, mon, lines):
        return [mon.feed(line) for line in lines]

    def test_markers_become_results_and_never_reach_the_user(self):
        out = io.StringIO()
        t = [100.0]
        mon = JobMonitor(["domu", "shim"], echo=True, out=out, clock=lambda: t[0])
        ends = self.feed(mon, [
            "(XEN) Xen version 4.17",
            "@@ready 6.2",
            "@@start domu",
            "[domu] hello",
            "[domu] Test result: SUCCESS",
            "@@job domu SUCCESS 1.5",
            "@@start shim",
            "(XEN) d2v0 Unhandled: vec 14, #PF",
            "[shim] (no console output for 20 s)",
            "@@job shim HANG 20.3",
            "@@done",
        ])
        self.assertEqual(ends[-1], Verdict.SUCCESS)
        self.assertTrue(all(e is None for e in ends[:-1]))
        printed = out.getvalue()
        self.assertNotIn("@@", printed)
        self.assertIn("[domu] hello", printed)
        r = mon.finish(Result(Verdict.SUCCESS, 30.0))
        self.assertEqual(r["domu"].verdict, Verdict.SUCCESS)
        self.assertEqual(r["domu"].seconds, 1.5)
        self.assertEqual(r["domu"].lines, ["hello", "Test result: SUCCESS"])
        self.assertEqual(r["shim"].verdict, Verdict.HANG)
        self.assertIn("host: (XEN) d2v0 Unhandled: vec 14, #PF", r["shim"].lines)

    def test_unknown_verdict_from_dom0_is_a_crash(self):
        mon = JobMonitor(["a"], echo=False)
        self.feed(mon, ["@@start a", "@@job a BOGUS 1.0"])
        self.assertEqual(mon.results["a"].verdict, Verdict.CRASH)

    def test_dom0_death_gives_every_waiting_job_the_serial_tail(self):
        out = io.StringIO()
        mon = JobMonitor(["a", "b"], echo=True, out=out)
        ends = self.feed(mon, ["@@start a", "@@job a ERROR 1.0", "@@start b",
                               "Kernel panic - not syncing: oops"])
        self.assertEqual(ends[-1], Verdict.CRASH)
        r = mon.finish(Result(Verdict.CRASH, 12.0))
        self.assertEqual(r["a"].verdict, Verdict.ERROR)
        self.assertEqual(r["b"].verdict, Verdict.CRASH)
        self.assertIn("Kernel panic", r["b"].tail())
        self.assertNotIn("@@", out.getvalue())

    def test_fatal_setup_is_a_crash_without_markers_shown(self):
        out = io.StringIO()
        mon = JobMonitor(["a"], echo=True, out=out)
        self.assertEqual(mon.feed("@@fatal insmod xenfs"), Verdict.CRASH)
        r = mon.finish(Result(Verdict.CRASH, 5.0))
        self.assertEqual(r["a"].verdict, Verdict.CRASH)
        self.assertIn("insmod xenfs", r["a"].tail())
        self.assertNotIn("@@", out.getvalue())

    def test_machine_timeout_and_hang_are_passed_on(self):
        for v in (Verdict.TIMEOUT, Verdict.HANG):
            mon = JobMonitor(["a"], echo=False)
            self.assertEqual(mon.finish(Result(v, 5.0))["a"].verdict, v)


def sh(script):
    return ["sh", "-c", script]


class RunQemu(unittest.TestCase):
    def test_result_line_ends_the_run_early(self):
        t = time.monotonic()
        r = run_qemu(sh("echo boot; echo 'Test result: SUCCESS'; sleep 30"), timeout=20,
                     echo=False, grace=0.1)
        self.assertEqual(r.verdict, Verdict.SUCCESS)
        self.assertLess(time.monotonic() - t, 5)

    def test_xen_halting_dom0_after_the_result_ends_the_grace(self):
        t = time.monotonic()
        r = run_qemu(sh("echo 'Test result: SUCCESS'; echo last; "
                        "echo '(XEN) Hardware Dom0 halted: halting machine'; sleep 30"),
                     timeout=20, echo=False, grace=10)
        self.assertEqual(r.verdict, Verdict.SUCCESS)
        self.assertLess(time.monotonic() - t, 5)
        self.assertIn("last", r.lines)

    def test_silence_is_a_hang_with_the_tail(self):
        t = time.monotonic()
        # 2 s: scripts/test runs these next to two qemu; a shell may take a while to start.
        r = run_qemu(sh("echo last words; sleep 30"), timeout=20, silence=2, echo=False)
        self.assertEqual(r.verdict, Verdict.HANG)
        self.assertLess(time.monotonic() - t, 8)
        self.assertIn("last words", r.tail())
        self.assertIn("no console output for 2 s", r.tail())

    def test_talking_without_a_result_is_a_timeout(self):
        r = run_qemu(sh("while :; do echo tick; sleep 0.1; done"), timeout=2.0, silence=1.0,
                     echo=False)
        self.assertEqual(r.verdict, Verdict.TIMEOUT)

    def test_exit_without_result(self):
        r = run_qemu(sh("echo 'qemu: could not load kernel'; exit 1"), timeout=10, echo=False)
        self.assertEqual(r.verdict, Verdict.EXITED)
        self.assertIn("could not load kernel", r.tail())

    def test_crash_line(self):
        r = run_qemu(sh("echo '(XEN) Panic on CPU 0:'; sleep 30"), timeout=10, echo=False,
                     grace=0.1)
        self.assertEqual(r.verdict, Verdict.CRASH)


if __name__ == "__main__":
    unittest.main()
