"""Workload 4: memory and time of ``imap`` over a generator of 10 million trivial items.

Each measurement runs in a fresh interpreter (this file with ``--rss-child``), so that the
figures hold only what the run itself needs. Run alone from the repository root with::

    .venv/bin/python benchmarks/bench_memory.py [--items N] [--repeats N]

``bench_core.py`` runs it as its fourth workload.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import escala
from benchlib import Table, secs, show, verdict

CORES = escala.usable_cpus()
MB = 1e6
TIME_LIMIT = 120.0  # seconds one measured run may take before it is stopped
NAMES = {
    "escala": "escala.imap(mode='processes')",
    "mp": "multiprocessing.Pool.imap chunksize=1000",
    "none": "for loop in the caller (no pool: the floor)",
}


def trivial(x: Any) -> Any:
    return x


def high_water_mark() -> int:
    """Peak RSS of this process in bytes (VmHWM: unlike ru_maxrss, it restarts at exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_child(kind: str, n: int) -> None:
    """Run one measured imap in this fresh process; print its figures as JSON."""
    import psutil

    me = psutil.Process()
    peak = {"workers_rss": 0, "total_pss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            workers_rss = 0
            total_pss = me.memory_full_info().pss
            for child in me.children(recursive=True):
                try:
                    workers_rss += child.memory_info().rss
                    total_pss += child.memory_full_info().pss
                except psutil.Error:
                    pass  # it exited meanwhile
            peak["workers_rss"] = max(peak["workers_rss"], workers_rss)
            peak["total_pss"] = max(peak["total_pss"], total_pss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    gen = (i for i in range(n))
    count = 0
    start = time.perf_counter()
    if kind == "escala":
        for _ in escala.imap(trivial, gen, mode="processes"):
            count += 1
    elif kind == "mp":
        with mp.Pool(CORES) as pool:
            for _ in pool.imap(trivial, gen, chunksize=1000):
                count += 1
            pool.close()
            pool.join()
    else:
        for _ in map(trivial, gen):
            count += 1
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if count != n:
        raise AssertionError(f"counted {count} results for {n} items")
    print(json.dumps({"wall": wall, "parent": high_water_mark()} | peak))


def measure(kind: str, n: int) -> dict[str, float]:
    """Run one measurement in a fresh interpreter (its own session, so it can be stopped).

    A run past :data:`TIME_LIMIT` is killed with everything in its session; it is reported
    with ``wall = inf`` and the peak RSS it had reached, read from /proc just before.
    """
    cmd = [sys.executable, __file__, "--rss-child", kind, str(n)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True) as child:
        try:
            out, _ = child.communicate(timeout=TIME_LIMIT)
        except subprocess.TimeoutExpired:
            with open(f"/proc/{child.pid}/status") as status:
                hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            nan = float("nan")
            return {
                "wall": float("inf"),
                "parent": hwm * 1024,
                "workers_rss": nan,
                "total_pss": nan,
            }
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def worst(values: list[float]) -> float:
    known = [value for value in values if not math.isnan(value)]
    return max(known) if known else float("nan")


def mb(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value / MB:.1f} MB"


def bench_memory(n: int, repeats: int) -> Table:
    """Time and peak memory of imap over a generator, escala against multiprocessing.Pool."""
    got: dict[str, dict[str, float]] = {}
    walls: dict[str, list[float]] = {}
    for kind in NAMES:
        runs = []
        for _ in range(repeats):
            runs.append(measure(kind, n))
            if runs[-1]["wall"] == float("inf"):
                break  # one overrun is enough to know
        got[kind] = {key: worst([run[key] for run in runs]) for key in runs[0]}
        walls[kind] = [run["wall"] for run in runs]
        got[kind]["wall"] = min(walls[kind])
    table = Table(
        f"4. imap over a generator of {n:,} trivial items, results counted and dropped "
        f"(wall: best of {repeats}; memory: worst of {repeats})",
        ["name", "wall (best)", "ratio to Pool.imap", "parent peak RSS",
         "workers peak RSS (sum)", "all processes peak PSS", "target < 100 MB"],
    )  # fmt: skip
    for kind, name in NAMES.items():
        fig = got[kind]
        stopped = fig["wall"] == float("inf")
        wall = f"stopped at {TIME_LIMIT:g} s" if stopped else secs(fig["wall"])
        ratio = "n/a" if stopped else f"{fig['wall'] / got['mp']['wall']:.2f}×"
        target = ""
        if kind == "escala":
            target = verdict(fig["parent"] / MB, 100)
            pss = fig["total_pss"] / MB
            table.targets += [
                (f"{name}: parent peak RSS < 100 MB", mb(fig["parent"]), target),
                (f"{name}: all processes peak PSS < 100 MB", mb(fig["total_pss"]),
                 "n/a" if math.isnan(pss) else verdict(pss, 100)),
                (f"{name}: no slower than Pool.imap", ratio,
                 "missed (stopped)" if stopped else verdict(fig["wall"], got["mp"]["wall"])),
            ]  # fmt: skip
        workers = "n/a" if kind == "none" else mb(fig["workers_rss"])
        table.rows.append(
            [name, wall, ratio, mb(fig["parent"]), workers, mb(fig["total_pss"]), target]
        )
        each = ", ".join("stopped" if w == float("inf") else secs(w) for w in walls[kind])
        table.notes.append(f"{name}: every run's wall time: {each}.")
    table.notes += [
        "Every run is a fresh interpreter. parent peak RSS = VmHWM of that process (exact). "
        "Workers are forked, so their RSS counts pages they share with the parent: "
        "workers peak RSS is the largest sum over all child processes, sampled with psutil "
        "every 50 ms; all processes peak PSS is the largest sum of the proportional set "
        "size of the parent and its children (shared pages split between them), the "
        "memory the run really holds. 1 MB = 10^6 bytes.",
    ]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]))
    else:
        show(bench_memory(args.items, args.repeats))


if __name__ == "__main__":
    main()
