"""scripts/bench: benchmark lazy-MMU batching in the guest under real Xen and show what it buys.

Boots the guest with `bench reps=N`, parses its BENCH- lines, prints a table, and writes
DIR/bench.csv and DIR/bench.svg (cycles per PTE write against N).
"""

import csv
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import machine, provision, toolstack
from .build import build_guest
from .cli import entry, parser
from .common import ROOT, Verdict
from .harness import run_qemu
from .options import bounded_int, positive_seconds

ROW_RE = re.compile(r"BENCH-ROW (.*)")
FOOT_RE = re.compile(r"BENCH-FOOTPRINT (.*)")
EXTRA_RE = re.compile(r"BENCH-(TYPECHANGE|TLB|SWITCH) ")
ORDER = ["eager", "lazy", "set_ptes", "lower_bound", "linux_like"]
COLOURS = {"eager": "#d62728", "lazy": "#1f77b4", "set_ptes": "#2ca02c",
           "lower_bound": "#000000", "linux_like": "#ff7f0e"}


INT_FIELDS = ["n", "hypercalls", "multicalls", "entries", "requests", "cycles", "pte_writes"]
FOOT_FIELDS = ["config", "entries", "requests", "bytes"]


def fields(text):
    """key=value words; a word without '=' (a line cut short) is ignored."""
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def _ratio(a, b):
    return a / b if b else float("nan")


def parse(lines):
    """(rows, footprints, problems) from the guest's BENCH- lines. A row that lacks a field or
    has a non-numeric one (a truncated line) is left out and named in `problems`; a zero divisor
    (zero cycles or PTE writes) gives NaN, shown as n/a."""
    rows, footprints, problems = [], [], []
    for line in lines:
        if m := ROW_RE.search(line):
            f = fields(m.group(1))
            missing = [k for k in ["strategy", "flushes", *INT_FIELDS] if k not in f]
            try:
                if missing:
                    raise ValueError(f"missing {', '.join(missing)}")
                row = {"strategy": f["strategy"], **{k: int(f[k]) for k in INT_FIELDS},
                       "flushes": f["flushes"]}
            except ValueError as e:
                problems.append(f"ignored a malformed BENCH-ROW ({e}): {line.strip()}")
                continue
            rows.append(row)
        elif m := FOOT_RE.search(line):
            f = fields(m.group(1))
            if all(k in f for k in FOOT_FIELDS) and f["bytes"].isdigit():
                footprints.append(f)
            else:
                problems.append(f"ignored a malformed BENCH-FOOTPRINT: {line.strip()}")
    lower = {r["n"]: r for r in rows if r["strategy"] == "lower_bound"}
    for r in rows:
        r["cycles_per_pte"] = _ratio(r["cycles"], r["pte_writes"])
        lb = lower.get(r["n"])
        r["ratio_to_lower_bound"] = _ratio(r["cycles"], lb["cycles"]) if lb else float("nan")
    return rows, footprints, problems


def _num(v, fmt, width):
    return f"{'n/a':>{width}}" if math.isnan(v) else f"{v:>{width}{fmt}}"


def table(rows):
    head = (f"{'strategy':<12} {'N':>6} {'hypercalls':>10} {'mc entries':>10} {'cycles/PTE':>11} "
            f"{'vs lower':>9}  flushes by reason")
    out = [head, "-" * len(head)]
    for n in sorted({r["n"] for r in rows}):
        for s in ORDER:
            for r in rows:
                if r["n"] == n and r["strategy"] == s:
                    out.append(f"{s:<12} {n:>6} {r['hypercalls']:>10} {r['entries']:>10} "
                               f"{_num(r['cycles_per_pte'], '.0f', 11)} {_num(r['ratio_to_lower_bound'], '.2f', 8)}x  "
                               f"{r['flushes']}")
        out.append("")
    return "\n".join(out)


def goals(rows):
    by = {(r["strategy"], r["n"]): r for r in rows}
    lines = []
    for n in sorted({r["n"] for r in rows}):
        lazy, eager, linux = by.get(("lazy", n)), by.get(("eager", n)), by.get(("linux_like", n))
        if not (lazy and eager and linux):
            continue
        fewer = _ratio(eager["hypercalls"], lazy["hypercalls"])
        ratio = lazy["ratio_to_lower_bound"]
        vs_linux = _ratio(lazy["cycles"], linux["cycles"])
        marks = []
        if n >= 512:
            marks.append(f"{fewer:.0f}x fewer hypercalls than eager (goal >= 50x: {'met' if fewer >= 50 else 'MISSED'})")
            marks.append(f"{ratio:.2f}x the lower bound (goal <= 1.2x: {'met' if ratio <= 1.2 else 'MISSED'})")
        if lazy["hypercalls"] == linux["hypercalls"] and abs(vs_linux - 1) < 0.05:
            # Both buffers hold the whole batch: the same code issues the same hypercalls.
            marks.append(f"{vs_linux:.2f}x linux-like's time (same hypercalls, same code path: "
                         "the difference is run-to-run noise)")
        else:
            marks.append(f"{vs_linux:.2f}x linux-like's time (goal <= 1: {'met' if vs_linux <= 1.0 else 'MISSED'})")
        lines.append(f"N={n:>6}: lazy is " + "; ".join(marks))
    return "\n".join(lines)


def svg(rows, path):
    """A log-log plot of cycles per PTE write against N (points that cannot be drawn on a log
    scale, zero or n/a, are left out)."""
    w, h, ml, mr, mt, mb = 720, 440, 70, 150, 30, 50
    rows = [r for r in rows if r["n"] > 0 and r["cycles_per_pte"] > 0]
    if not rows:
        path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="40">'
                        '<text x="10" y="25">no plottable rows</text></svg>')
        return
    ns = sorted({r["n"] for r in rows})
    ys = [r["cycles_per_pte"] for r in rows]
    lx0, lx1 = math.log10(ns[0]), math.log10(ns[-1])
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    X = lambda n: ml + (math.log10(n) - lx0) / max(lx1 - lx0, 1e-9) * (w - ml - mr)  # noqa: E731
    Y = lambda y: h - mb - (math.log10(y) - ly0) / max(ly1 - ly0, 1e-9) * (h - mt - mb)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w/2}" y="18" text-anchor="middle" font-size="14">cycles per PTE write vs N (map + unmap, median)</text>']
    for n in ns:
        parts.append(f'<line x1="{X(n):.1f}" y1="{mt}" x2="{X(n):.1f}" y2="{h-mb}" stroke="#ddd"/>')
        parts.append(f'<text x="{X(n):.1f}" y="{h-mb+16}" text-anchor="middle">{n}</text>')
    for e in range(ly0, ly1 + 1):
        parts.append(f'<line x1="{ml}" y1="{Y(10**e):.1f}" x2="{w-mr}" y2="{Y(10**e):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{ml-6}" y="{Y(10**e)+4:.1f}" text-anchor="end">1e{e}</text>')
    parts.append(f'<text x="{(ml + w - mr)/2}" y="{h-12}" text-anchor="middle">N (PTEs mapped, then unmapped)</text>')
    for i, s in enumerate(ORDER):
        pts = sorted((r["n"], r["cycles_per_pte"]) for r in rows if r["strategy"] == s)
        if not pts:
            continue
        c = COLOURS[s]
        poly = " ".join(f"{X(n):.1f},{Y(y):.1f}" for n, y in pts)
        parts.append(f'<polyline points="{poly}" fill="none" stroke="{c}" stroke-width="2"/>')
        parts += [f'<circle cx="{X(n):.1f}" cy="{Y(y):.1f}" r="3" fill="{c}"/>' for n, y in pts]
        ly = mt + 20 + i * 20
        parts.append(f'<line x1="{w-mr+15}" y1="{ly}" x2="{w-mr+40}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        parts.append(f'<text x="{w-mr+45}" y="{ly+4}">{s}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


# The harness's own goals: wall time of `scripts/run --mode M` from start to exit with
# the dom0 snapshot cached, and the speed-up over a cold boot measured in the same invocation.
HARNESS_GOALS = {"domu": 4.0, "shim": 5.0}
HARNESS_SPEEDUP = 2.5
TIMING_RE = re.compile(r"^timing: (.*): ([0-9.]+) s$")


def timed_run(mode, cold):
    """(wall seconds, passed, {phase: seconds}) of one `scripts/run --mode MODE --quiet`."""
    cmd = [str(ROOT / "scripts" / "run"), "--mode", mode, "--quiet"] + (["--cold"] if cold else [])
    env = dict(os.environ, XENPV_TIMINGS="1")
    env.pop("XENPV_COLD", None)
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.monotonic() - t
    phases = {}
    for line in r.stdout.splitlines():
        if m := TIMING_RE.match(line):
            phases[m.group(1)] = float(m.group(2))
    ok = r.returncode == 0 and f"== {mode}: SUCCESS" in r.stdout
    if not ok:
        print(f"scripts/run --mode {mode}{' --cold' if cold else ''} failed "
              f"(exit {r.returncode}):\n{(r.stdout + r.stderr)[-2000:]}", flush=True)
    return wall, ok, phases


def harness_goals(runs):
    """Warm and cold toolstack runs side by side; prints the goals and where a warm run's time
    goes. 0 if every run passed and every goal is met."""
    print(f"warming up (a first run takes the dom0 snapshot if it is missing) ...", flush=True)
    ok_all = all(timed_run(m, False)[1] for m in HARNESS_GOALS)
    walls = {(m, c): [] for m in HARNESS_GOALS for c in (False, True)}
    phases = {m: {} for m in HARNESS_GOALS}
    for i in range(runs):
        for mode in HARNESS_GOALS:
            for cold in (False, True):
                wall, ok, ph = timed_run(mode, cold)
                ok_all &= ok
                walls[mode, cold].append(wall)
                print(f"  run {i + 1}: {mode:4} {'cold' if cold else 'warm'} {wall:5.1f} s "
                      f"{'ok' if ok else 'FAILED'}", flush=True)
                if not cold:
                    for k, v in ph.items():
                        phases[mode].setdefault(k, []).append(v)
    print(f"\nharness goals: wall time of scripts/run from start to exit, median of {runs} "
          f"(min-max); warm = dom0 restored from its snapshot, cold = booted (--cold)")
    print(f"{'mode':5} {'warm':>18} {'cold':>18} {'speed-up':>9}  goals")
    met = True
    for mode, limit in HARNESS_GOALS.items():
        w, c = walls[mode, False], walls[mode, True]
        wm, cm = statistics.median(w), statistics.median(c)
        speed = cm / wm
        g1, g2 = wm <= limit, speed >= HARNESS_SPEEDUP
        met &= g1 and g2
        print(f"{mode:5} {wm:6.1f} s ({min(w):.1f}-{max(w):.1f}) {cm:6.1f} s ({min(c):.1f}-"
              f"{max(c):.1f}) {speed:8.1f}x  warm <= {limit:g} s: {'met' if g1 else 'MISSED'}; "
              f">= {HARNESS_SPEEDUP:g}x cold: {'met' if g2 else 'MISSED'}")
    for mode in HARNESS_GOALS:
        print(f"\nwhere a warm {mode} run's seconds go (median of {runs}):")
        for k, v in phases[mode].items():
            print(f"  {statistics.median(v):5.2f} s  {k}")
    load = os.getloadavg()[0]
    print(f"\n(host load average {load:.1f} on {os.cpu_count()} CPUs: other work on the machine "
          f"slows every run)")
    if not ok_all:
        print("some runs FAILED")
    return 0 if ok_all and met else 1


def main(argv=None):
    ap = parser("scripts/bench", """\
Benchmark lazy-MMU batching in the guest under real Xen: boots the guest with `bench reps=N`,
prints for N = 1 ... 65536 PTEs mapped then unmapped the hypercalls, multicall entries, cycles per
PTE write and the ratio to the lower bound, and writes bench.csv and bench.svg.

--harness measures the harness instead: scripts/run --mode domu and --mode shim with the dom0
snapshot (warm) and --cold, side by side, against its goals (warm domu <= 4 s, shim <= 5 s,
>= 2.5x faster than cold), and where a warm run's seconds go.""")
    ap.add_argument("--harness", action="store_true",
                    help="measure scripts/run itself, warm vs cold (see above)")
    ap.add_argument("--runs", type=bounded_int(1, 50), default=3, metavar="N",
                    help="--harness: runs per mode and kind (default 3)")
    ap.add_argument("--mode", choices=["dom0", "domu", "shim"], default="dom0",
                    help="how the guest boots, as for scripts/run (default dom0)")
    ap.add_argument("--reps", type=bounded_int(1, 1000), default=5, metavar="N",
                    help="timed repetitions per point, the median is reported (1-1000, default 5)")
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "bench", metavar="DIR",
                    help="where bench.csv and bench.svg go (default target/bench)")
    ap.add_argument("--timeout", type=positive_seconds, default=600.0, metavar="S",
                    help="seconds for the whole benchmark (default 600)")
    ap.add_argument("--silence", type=positive_seconds, default=300.0, metavar="S",
                    help="seconds without a line from the guest before it counts as HANG "
                         "(default 300: a large N takes long under TCG)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.harness:
        return harness_goals(args.runs)
    paths = provision.ensure_base()
    guest = build_guest()
    cmdline = f"bench reps={args.reps}"
    if args.mode == "dom0":
        r = run_qemu(machine.dom0_guest(paths["xen"], guest, cmdline), timeout=args.timeout,
                     silence=args.silence, echo=False)
    else:
        kind = {"domu": "pv", "shim": "shim"}[args.mode]
        job = toolstack.Job(args.mode, kind, guest, cmdline, memory_mb=128)
        r = toolstack.run_jobs([job], silence=args.silence, timeout=args.timeout,
                               echo=False)[args.mode]
    rows, footprints, problems = parse(r.lines)
    for p in problems:
        print(f"warning: {p}")
    if r.verdict != Verdict.SUCCESS or not rows:
        print(f"benchmark did not complete: {r.verdict}\n{r.tail(40)}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        wr.writeheader()
        wr.writerows(rows)
    svg(rows, args.out / "bench.svg")
    print(f"mode {args.mode}, {args.reps} timed repetitions per point (median), rdtsc cycles "
          f"(TCG: ratios and counts matter, not absolute cycles); boot took "
          f"{r.since_qemu_start:.1f} s\n")
    print(table(rows))
    for fp in footprints:
        print(f"buffer per vCPU, {fp['config']}: {fp['entries']} entries / {fp['requests']} "
              f"requests = {int(fp['bytes'])} bytes")
    print()
    print(goals(rows))
    # The rules' own costs (type-change flushes, TLB-op coalescing, context switches): shown as
    # the guest printed them.
    extra = [line.strip() for line in r.lines if EXTRA_RE.search(line)]
    if extra:
        print()
        print("\n".join(extra))
    print(f"\nwrote {args.out / 'bench.csv'} and {args.out / 'bench.svg'}")
    return 0


if __name__ == "__main__":
    entry(main)
