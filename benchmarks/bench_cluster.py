"""escala.map on local Ray and Dask clusters against the loops a user would write by hand.

Run from the repository root::

    .venv/bin/python benchmarks/bench_cluster.py [--quick] [--engine dask|ray|both] [--json PATH]

The claim checked: escala's batching beats one engine task per item on small tasks and
matches it on large ones. Each engine's cluster is started once and shared by escala and
the hand-written loop, so both pay the same workers, scheduler and warm-up; every figure is
the median of several runs, escala and the hand-written loop taken in turn.

Tasks are defined in this script, so both engines cloudpickle them by value: the workers
need not import anything from ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from typing import Any

from rich.markup import escape

import escala
from benchlib import Table, best, machine_line, secs, show, warn_stray_children

CORES = escala.usable_cpus()
ENGINES = ("dask", "ray")

# -- tasks --------------------------------------------------------------------------


def inc(x: int) -> int:
    return x + 1


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def calibrate(seconds: float) -> tuple[int, float]:
    """Return a loop count for which ``spin`` takes about ``seconds`` here, and its time.

    The time is the median of several runs in this process, before any cluster starts.
    """
    n = 10_000
    while (took := best(lambda: spin(n), 3)) < 0.02:
        n *= 2
    n = max(1, int(n * seconds / took))
    return n, statistics.median(best(lambda: spin(n), 1) for _ in range(7))


@dataclass(frozen=True)
class Workload:
    """One row group: ``n`` tasks of ``fn(item)``, each taking ``task_s`` in the parent."""

    key: str
    title: str
    fn: Callable[[Any], Any]
    items: list[Any]
    task_s: float

    @property
    def ideal(self) -> float:
        """The wall time of perfect scaling: the tasks' CPU time spread over every core."""
        return len(self.items) * self.task_s / CORES


def workloads(quick: bool) -> list[Workload]:
    trivial_n = 2_000 if quick else 10_000
    items = list(range(trivial_n))
    # a trivial task's own time, so that its ideal wall is not taken as zero
    per_inc = statistics.median(best(lambda: list(map(inc, items)), 1) for _ in range(5))
    small_n, small_s = calibrate(0.001)
    large_n, large_s = calibrate(0.075)
    return [
        Workload("trivial", "trivial tasks (inc: x + 1)", inc, items, per_inc / trivial_n),
        Workload(
            "small",
            f"small tasks (spin({small_n:,}))",
            spin,
            [small_n] * (500 if quick else 2_000),
            small_s,
        ),
        Workload(
            "large",
            f"large tasks (spin({large_n:,}))",
            spin,
            [large_n] * (8 if quick else 20) * CORES,
            large_s,
        ),
    ]


# -- timing -------------------------------------------------------------------------


@dataclass
class Result:
    """One contender on one workload, as ``--json`` saves it."""

    engine: str
    workload: str
    contender: str
    n: int
    task_s: float
    ideal_s: float
    runs_s: list[float]
    wall_s: float  # median of runs_s
    tasks_per_s: float
    overhead_per_task_s: float  # (wall - ideal) / n
    ratio_to_hand: float | None  # escala's wall / the hand-written loop's wall


def median_each(
    runs: dict[str, Callable[[], Any]], repeats: int, expect: Any
) -> dict[str, list[float]]:
    """Time every contender ``repeats`` times, in turn, each round in the other order.

    Taking them in turn spreads a noisy neighbour over all of them; reversing the order
    every round keeps one contender from always running right after another's cleanup.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(best(runs[name], 1, expect))
    return times


# -- engines: each yields its contenders, sharing one cluster -------------------------


Contenders = Callable[[Workload], dict[str, Callable[[], Any]]]


@contextmanager
def dask_engine() -> Iterator[Contenders]:
    import distributed

    cluster = distributed.LocalCluster(
        n_workers=CORES, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        # Client(cluster) becomes the default client, as in a user's script
        client = distributed.Client(cluster)
        try:
            address = cluster.scheduler_address

            def contenders(work: Workload) -> dict[str, Callable[[], Any]]:
                fn, items = work.fn, work.items
                return {
                    # address= makes escala open (and close) its own Client on every call,
                    # inside the timing: what a script naming a running cluster pays
                    "escala.map(mode='dask', address=...)": lambda: escala.map(
                        fn, items, mode="dask", address=address
                    ),
                    # no address: escala runs on the current (default) Client, connecting
                    # nothing; the difference to the row above is that connection
                    "escala.map(mode='dask'), current Client": lambda: escala.map(
                        fn, items, mode="dask"
                    ),
                    # pure=False, as a user must where items repeat (spin's are all the same
                    # n): with Dask's default pure=True, equal calls share one key and run
                    # once
                    "client.gather(client.map(fn, items, pure=False))": lambda: client.gather(
                        client.map(fn, items, pure=False)
                    ),
                }

            yield contenders
        finally:
            client.close()
    finally:
        cluster.close()


@contextmanager
def ray_engine() -> Iterator[Contenders]:
    import ray

    ray.init(num_cpus=CORES, include_dashboard=False)
    try:
        remote: dict[Callable[[Any], Any], Any] = {}

        def contenders(work: Workload) -> dict[str, Callable[[], Any]]:
            fn, items = work.fn, work.items
            task = remote.setdefault(fn, ray.remote(fn))
            return {
                # no address: escala finds this process's ray.init and leaves it running
                "escala.map(mode='ray')": lambda: escala.map(fn, items, mode="ray"),
                "ray.get([task.remote(x) for x in items])": lambda: ray.get(
                    [task.remote(x) for x in items]
                ),
            }

        yield contenders
    finally:
        ray.shutdown()


def bench_engine(engine: str, works: list[Workload], repeats: int) -> list[Result]:
    results: list[Result] = []
    with (dask_engine if engine == "dask" else ray_engine)() as contenders:
        # warm up: worker processes started, functions shipped, connections made
        for work in works:
            for run in contenders(replace(work, items=work.items[: 2 * CORES])).values():
                run()
        for work in works:
            known = {x: work.fn(x) for x in set(work.items)}  # spin's items all repeat
            expect = [known[x] for x in work.items]
            print(f"  {engine}: {len(work.items):,} {work.title} ...", flush=True)
            runs = median_each(contenders(work), repeats, expect)
            hand = next(statistics.median(t) for name, t in runs.items() if "escala" not in name)
            for name, times in runs.items():
                wall = statistics.median(times)
                n = len(work.items)
                results.append(
                    Result(
                        engine,
                        work.key,
                        name,
                        n,
                        work.task_s,
                        work.ideal,
                        times,
                        wall,
                        n / wall,
                        (wall - work.ideal) / n,
                        wall / hand if "escala" in name else None,
                    )
                )
    return results


# -- report -------------------------------------------------------------------------


def per_task(value: float) -> str:
    """Microseconds, the unit of a per-task cost, with decimals below 10 µs."""
    micros = value * 1e6
    return f"{micros:,.2f} µs" if abs(micros) < 10 else f"{micros:,.0f} µs"


def places(ratio: float) -> int:
    """Decimals that leave a small ratio two significant digits (0.012×, not 0.01×)."""
    return 3 if ratio < 0.1 else 2


def tables(works: list[Workload], results: list[Result], repeats: int) -> list[Table]:
    out = []
    for work in works:
        task_time = secs(work.task_s) if work.task_s >= 1e-4 else per_task(work.task_s)
        table = Table(
            f"{len(work.items):,} {work.title}, {task_time} each "
            f"({CORES} workers, median of {repeats}; ideal {secs(work.ideal)})",
            [
                "engine",
                "contender",
                "wall (median)",
                "tasks/s",
                "overhead per task",
                "escala / hand",
            ],
        )
        for r in (r for r in results if r.workload == work.key):
            ratio = (
                "" if r.ratio_to_hand is None else f"{r.ratio_to_hand:.{places(r.ratio_to_hand)}f}×"
            )
            table.rows.append(
                [
                    r.engine,
                    escape(r.contender),  # its brackets are not rich markup
                    secs(r.wall_s),
                    f"{r.tasks_per_s:,.0f}",
                    per_task(r.overhead_per_task_s),
                    ratio,
                ]
            )
            table.notes.append(
                escape(f"{r.engine}, {r.contender}: runs ") + ", ".join(secs(t) for t in r.runs_s)
            )
        table.notes.append(
            f"overhead per task = (wall − ideal) / {len(work.items):,}, ideal = tasks × "
            f"{task_time} (one task in the parent) / {CORES} cores."
        )
        out.append(table)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    parser.add_argument("--engine", choices=[*ENGINES, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--json", metavar="PATH", help="save the figures here")
    args = parser.parse_args()
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    if os.environ.get("PYTHONPATH"):  # escala may come from elsewhere than src/
        command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {command}"
    libs = ", ".join(f"{name} {version(name)}" for name in ("ray", "dask", "distributed"))
    header = [
        f"- Machine: {machine_line()}, {libs}",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
    ]
    print("\n".join(header) + "\n")
    works = workloads(args.quick)  # calibrated before any cluster runs beside it
    results: list[Result] = []
    for engine in ENGINES if args.engine == "both" else (args.engine,):
        results += bench_engine(engine, works, args.repeats)
    for table in tables(works, results, args.repeats):
        show(table)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"header": header, "results": [asdict(r) for r in results]}, out, indent=1)
    warn_stray_children()


if __name__ == "__main__":
    main()
