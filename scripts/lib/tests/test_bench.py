"""The benchmark's parser, table, goals and plot: truncated lines and zero cycles."""

import math
import tempfile
import unittest
from pathlib import Path

from lib.bench import goals, parse, svg, table


def row(strategy, n, cycles, hypercalls=10, pte_writes=None, **over):
    f = {"strategy": strategy, "n": n, "hypercalls": hypercalls, "multicalls": 1, "entries": 2,
         "requests": n, "flushes": "leave:1", "cycles": cycles,
         "pte_writes": 2 * n if pte_writes is None else pte_writes}
    f.update(over)
    return "BENCH-ROW " + " ".join(f"{k}={v}" for k, v in f.items())


GOOD = [row("eager", 512, 900000, hypercalls=1024), row("lazy", 512, 110000, hypercalls=4),
        row("lower_bound", 512, 100000, hypercalls=1), row("linux_like", 512, 120000,
                                                             hypercalls=32),
        row("set_ptes", 512, 105000, hypercalls=2),
        "BENCH-FOOTPRINT config=lazy entries=64 requests=512 bytes=10240"]


class Parse(unittest.TestCase):
    def test_good_rows(self):
        rows, fps, problems = parse(GOOD)
        self.assertEqual(len(rows), 5)
        self.assertEqual(problems, [])
        self.assertEqual(fps[0]["bytes"], "10240")
        lazy = next(r for r in rows if r["strategy"] == "lazy")
        self.assertAlmostEqual(lazy["ratio_to_lower_bound"], 1.1)
        self.assertAlmostEqual(lazy["cycles_per_pte"], 110000 / 1024)
        self.assertIn("met", goals(rows))

    def test_truncated_row_is_reported_not_a_traceback(self):
        cut = row("lazy", 4096, 5000)
        for line in (cut[:40], cut[:cut.index("cycles=") + 7], "BENCH-ROW strategy=lazy n=1x"):
            with self.subTest(line=line):
                rows, _, problems = parse(GOOD + [line])
                self.assertEqual(len(rows), 5)
                self.assertEqual(len(problems), 1)
                self.assertIn("malformed BENCH-ROW", problems[0])

    def test_truncated_footprint(self):
        _, fps, problems = parse(["BENCH-FOOTPRINT config=lazy entries=64 requ"])
        self.assertEqual(fps, [])
        self.assertEqual(len(problems), 1)

    def test_zero_cycles_and_zero_writes(self):
        lines = [row("lower_bound", 1, 0), row("lazy", 1, 0), row("eager", 1, 10, hypercalls=0),
                 row("linux_like", 1, 0, pte_writes=0)]
        rows, _, problems = parse(lines)
        self.assertEqual(problems, [])
        lazy = next(r for r in rows if r["strategy"] == "lazy")
        self.assertTrue(math.isnan(lazy["ratio_to_lower_bound"]))
        text = table(rows)
        self.assertIn("n/a", text)
        goals(rows)
        with tempfile.TemporaryDirectory() as d:
            svg(rows, Path(d) / "b.svg")
            self.assertIn("<svg", (Path(d) / "b.svg").read_text())

    def test_plot(self):
        rows, _, _ = parse(GOOD + [row("lazy", 1, 500), row("lower_bound", 1, 400)])
        with tempfile.TemporaryDirectory() as d:
            svg(rows, Path(d) / "b.svg")
            self.assertIn("polyline", (Path(d) / "b.svg").read_text())


if __name__ == "__main__":
    unittest.main()
