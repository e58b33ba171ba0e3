"""mode="auto" against the best fixed mode, on every built-in workload and a few long tasks.

Run from the repository root::

    .venv/bin/python benchmarks/bench_auto.py [--scale 1.0] [--repeat 5] [--markdown PATH]

Targets (core issue on auto mode): on every built-in workload, auto finishes within 10 % of
the best fixed mode, its measuring included; on trivial tasks it is never more than 10 %
slower than sequential. "Fixed modes" here are the ones that run the same function:
sequential, threads and processes with their default sizes, and threads with one thread
per item (the best any thread count can do for waiting work). The async rows of the
built-in workloads run an async twin of the function, another program; they are shown for
reference, not counted.

Each workload is prepared once; the modes take turns for ``--repeat`` rounds, and each
keeps its best time. A first auto call in a fresh process also measures what a hand-off
costs on the machine (cached for the process): that one-time cost is measured and reported
separately, in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import shlex
import subprocess
import sys
import time
from typing import Any

import escala
from benchlib import Table, machine_line, markdown, secs, show
from escala import bench

FIXED = ("sequential", "threads", "processes")


def run_workload(name: str, scale: float, repeat: int) -> Table:
    workload = bench.workloads.get(name)
    modes = (*FIXED, "async", "auto")
    comparison = bench.compare(workload, modes, scale=scale, repeat=repeat)
    with workload.prepared(scale) as prepared:
        items = len(prepared.items)
    one_each = bench.compare(
        workload, ("sequential", "threads"), scale=scale, workers=items, repeat=repeat
    ).result("threads")
    table = Table(
        f"{comparison.title} ({name}, {items} items)",
        ["mode", "workers", "wall (best)", "ratio to best fixed mode"],
    )
    fixed = [r for r in comparison.results if r.mode in FIXED and r.ran and r.correct]
    if one_each is not None and one_each.ran and one_each.correct:
        fixed.append(one_each)
    best_run = min(fixed, key=lambda r: r.wall)
    rows = [*comparison.results]
    if one_each is not None:
        rows.insert(3, one_each)
    for run in rows:
        label = run.mode
        if run is one_each:
            label = "threads (one per item)"
        if run.advice is not None:
            label = f"auto → {run.advice.mode}"
        counted = "" if run.mode in FIXED or run.mode == "auto" else " (async twin, not counted)"
        table.rows.append(
            [
                label + counted,
                str(run.workers) if run.ran else "—",
                secs(run.wall) if run.ran else "—",
                f"{run.wall / best_run.wall:.2f}×" if run.ran else "—",
            ]
        )
    auto = comparison.result("auto")
    assert auto is not None
    best_label = "threads (one per item)" if best_run is one_each else best_run.mode
    ratio = auto.wall / best_run.wall
    table.targets.append(
        (
            f"{name}: auto within 10 % of the best fixed mode ({best_label})",
            f"{ratio:.2f}×",
            "met" if ratio <= 1.10 else f"missed by {(ratio - 1.10) * 100:.0f} points",
        )
    )
    if name == "trivial":
        seq = comparison.result("sequential")
        assert seq is not None
        slower = auto.wall / seq.wall
        table.targets.append(
            (
                "trivial: auto never more than 10 % slower than sequential",
                f"{slower:.2f}×",
                "met" if slower <= 1.10 else f"missed by {(slower - 1.10) * 100:.0f} points",
            )
        )
    if auto.advice is not None:
        chosen = auto.advice.mode
        table.notes.append(
            f"auto chose {chosen} with {auto.advice.workers} workers"
            f" ({auto.advice.reason.value}); the built-in workload expects {workload.expected}."
        )
    return table


def inc(x: int) -> int:
    return x + 1


def trivial_at_scale(repeat: int) -> Table:
    """Trivial tasks where the job is big enough that a fixed cost is not the whole story."""
    table = Table(
        "Tiny tasks (x + 1) at larger sizes: auto against sequential",
        ["items", "sequential (best)", "auto (best)", "auto ÷ sequential", "auto's cost"],
    )
    for n in (20_000, 200_000, 2_000_000):
        items = list(range(n))
        seq = min(_timed(lambda: escala.map(inc, items, mode="sequential")) for _ in range(repeat))
        auto = min(_timed(lambda: escala.map(inc, items)) for _ in range(repeat))
        table.rows.append([f"{n:,}", secs(seq), secs(auto), f"{auto / seq:.2f}×", secs(auto - seq)])
        table.targets.append(
            (
                f"trivial, {n:,} items: auto never more than 10 % slower than sequential",
                f"{auto / seq:.2f}×",
                "met"
                if auto / seq <= 1.10
                else f"missed by {(auto / seq - 1.10) * 100:.0f} points",
            )
        )
    table.notes.append(
        "auto's cost is a fixed ~0.3–0.5 ms (starting the sampling thread, measuring): it "
        "dominates sub-millisecond jobs and vanishes in larger ones."
    )
    return table


def compute_for(seconds: float, x: int) -> int:
    """Compute in Python, holding the GIL, for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return x


def few_long_tasks(repeat: int) -> Table:
    """As many items as cores (or a few more), each far longer than the sampling window.

    The first task is still running when the window closes, so what it has run is only a
    lower bound of its length (the issue on auto's closed loop, class 1).
    """
    table = Table(
        f"Few long tasks, computing in Python (best of {repeat})",
        ["workload", "sequential", "threads", "processes", "auto", "auto ÷ best", "auto chose"],
    )
    for n, seconds in ((2, 0.5), (2, 0.25), (3, 0.2), (4, 0.3)):
        task = functools.partial(compute_for, seconds)
        items = list(range(n))
        walls = {
            mode: min(_timed(lambda m=mode: escala.map(task, items, mode=m)) for _ in range(repeat))
            for mode in ("sequential", "threads", "processes", "auto")
        }
        best = min(walls[m] for m in FIXED)
        chose = escala.advise(task, items).mode
        ratio = walls["auto"] / best
        table.rows.append(
            [
                f"{n} × {seconds:g} s",
                *(secs(walls[m]) for m in (*FIXED, "auto")),
                f"{ratio:.2f}×",
                chose,
            ]
        )
        table.targets.append(
            (
                f"few long tasks, {n} × {seconds:g} s: auto within 10 % of the best fixed mode",
                f"{ratio:.2f}×",
                "met" if ratio <= 1.10 else f"missed by {(ratio - 1.10) * 100:.0f} points",
            )
        )
    table.notes.append(
        "With more items than cores, the first task goes on on the sampling thread beside the "
        "worker processes: three computing tasks share two cores until it ends."
    )
    return table


def _timed(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


FIRST_CALL = """
import time, escala
from escala.advisor import _overhead
def spin(n):
    t = 0
    for i in range(n):
        t += i * i
    return t
start = time.perf_counter()
_overhead.overheads(escala.usable_cpus(), processes=True)
print(time.perf_counter() - start)
"""


def one_time_cost() -> float:
    """Seconds a fresh process spends measuring hand-off costs on its first auto call."""
    out = subprocess.run(
        [sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args()
    header = [
        f"- Machine: {machine_line()}",
        f"- Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
    ]
    for line in header:
        print(line)
    escala.advise(escala.usable_cpus, range(3))  # the process's one-time measurements
    started = time.perf_counter()
    tables = [run_workload(name, args.scale, args.repeat) for name in bench.workloads.names()]
    trivial = trivial_at_scale(args.repeat)
    tables += [trivial, few_long_tasks(args.repeat)]
    cost = one_time_cost()
    trivial.notes.append(
        f"A process's first auto call also measures hand-off costs once: {secs(cost)} in a "
        "fresh interpreter (threads and processes); later calls use the cached figures. "
        "The rows above were timed after that first call."
    )
    for table in tables:
        show(table)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(tables, header))


if __name__ == "__main__":
    main()
