"""escala's modes against named peers, on the four workloads of the performance issue.

Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py [--quick] [--markdown PATH] [--only 1,3]

Every time is the best (minimum) of several repeats, and every ratio compares figures taken
in the same invocation, so that a noisy shared machine moves both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import datetime
import multiprocessing as mp
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import escala
from bench_memory import bench_memory
from benchlib import (
    Table,
    abest,
    best,
    best_each,
    machine_line,
    markdown,
    secs,
    show,
    verdict,
    warn_stray_children,
)

SLEEP = 0.05  # workload 3: each task blocks this long
CORES = escala.usable_cpus()

# -- tasks: module level, so that every process pool can import them by name -----------


def trivial(x: Any) -> Any:
    return x


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def block(x: Any) -> Any:
    time.sleep(SLEEP)
    return x


async def ablock(x: Any) -> Any:
    await asyncio.sleep(SLEEP)
    return x


# -- peers ---------------------------------------------------------------------------


def shut_loky() -> None:
    """Stop joblib's reusable loky executor, so the next Parallel call starts its workers."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def mp_map(fn: Callable[[Any], Any], items: list[Any], chunksize: int | None = None) -> Any:
    with mp.Pool(CORES) as pool:
        out = pool.map(fn, items, chunksize)
        pool.close()
        pool.join()
    return out


def ppe_map(fn: Callable[[Any], Any], items: list[Any], chunksize: int = 1) -> list[Any]:
    with cf.ProcessPoolExecutor(CORES) as ex:
        return list(ex.map(fn, items, chunksize=chunksize))


def joblib_map(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    from joblib import Parallel, delayed

    return Parallel(n_jobs=CORES)(delayed(fn)(x) for x in items)


def mpire_map(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=CORES) as pool:
        return pool.map(fn, items)


# -- workload 1: 100,000 trivial calls -------------------------------------------------


def bench_trivial(n: int, repeats: int) -> Table:
    items = list(range(n))
    cold = best_each(
        {
            "escala.map(mode='processes')": lambda: escala.map(trivial, items, mode="processes"),
            "multiprocessing.Pool.map": lambda: mp_map(trivial, items),
            "ProcessPoolExecutor chunksize=n//8": lambda: ppe_map(trivial, items, n // 8),
            "joblib.Parallel (loky, fresh executor)": lambda: joblib_map(trivial, items),
            "mpire WorkerPool.map": lambda: mpire_map(trivial, items),
            "escala.map(mode='sequential')": lambda: escala.map(trivial, items, mode="sequential"),
            "escala.map(mode='threads')": lambda: escala.map(trivial, items, mode="threads"),
            "list(map(trivial, items)) in the caller": lambda: list(map(trivial, items)),
        },
        repeats,
        items,
        setup={"joblib.Parallel (loky, fresh executor)": shut_loky},
    )
    cold["ProcessPoolExecutor chunksize=1 (1 run)"] = best(
        lambda: ppe_map(trivial, items), 1, items
    )
    with escala.Pool("processes", CORES) as pool, mp.Pool(CORES) as mpool:
        warm_runs = {
            "escala.Pool('processes').map (warm)": lambda: pool.map(trivial, items),
            "multiprocessing.Pool.map (warm)": lambda: mpool.map(trivial, items),
            "joblib.Parallel (loky executor reused)": lambda: joblib_map(trivial, items),
        }
        for fn in warm_runs.values():
            fn()  # start every worker before timing
        warm = best_each(warm_runs, repeats, items)
        mpool.close()
        mpool.join()
    shut_loky()

    peers_cold = min(t for k, t in cold.items() if not k.startswith(("escala", "list")))
    peers_warm = min(t for k, t in warm.items() if not k.startswith("escala"))
    table = Table(
        f"1. {n:,} trivial calls ({CORES} workers, best of {repeats})",
        ["name", "pool start-up", "wall (best)", "ratio to fastest peer", "target"],
    )
    for group, times, fastest in (("included", cold, peers_cold), ("warm", warm, peers_warm)):
        for name, took in times.items():
            target = ""
            if name.startswith("escala") and "processes" in name:
                target = verdict(took, fastest)
                table.targets.append(
                    (f"{name} as fast as the fastest peer ({group})", secs(took), target)
                )
            startup = "n/a" if "sequential" in name or name.startswith("list") else group
            table.rows.append([name, startup, secs(took), f"{took / fastest:.2f}×", target])
    table.notes += [
        "Ratios compare with the fastest non-escala peer of the same kind: start-up included "
        f"({secs(peers_cold)}) or warm ({secs(peers_warm)}).",
        "ProcessPoolExecutor chunksize=1 ran once on the full input (too slow to repeat).",
        "Pools with start-up included are created, used and closed/joined inside the timing; "
        "warm pools are started and used once before timing.",
    ]
    return table


# -- workload 2: 16 CPU-bound tasks of ~0.25 s -----------------------------------------


def calibrate(seconds: float) -> tuple[int, float]:
    """Return a loop count for which ``spin`` takes about ``seconds`` here, and its time."""
    n = 100_000
    while (took := best(lambda: spin(n), 3)) < 0.05:
        n *= 2
    n = int(n * seconds / took)
    return n, best(lambda: spin(n), 5)


def bench_cpu(tasks: int, seconds: float, repeats: int) -> Table:
    n, single = calibrate(seconds)
    items = [n] * tasks
    expect = [spin(n)] * tasks
    runs = {
        "escala.map(mode='processes')": lambda: escala.map(spin, items, mode="processes"),
        "multiprocessing.Pool.map chunksize=1": lambda: mp_map(spin, items, 1),
        "ProcessPoolExecutor.map": lambda: ppe_map(spin, items),
        "joblib.Parallel (loky, fresh executor)": lambda: joblib_map(spin, items),
        "mpire WorkerPool.map": lambda: mpire_map(spin, items),
    }
    one = "one task in the parent"
    runs[one] = lambda: [spin(n)] * tasks  # in the same rounds, so under the same noise
    times = best_each(
        runs, repeats, expect, setup={"joblib.Parallel (loky, fresh executor)": shut_loky}
    )
    single = min(single, times.pop(one))
    shut_loky()
    fastest = min(t for k, t in times.items() if not k.startswith("escala"))
    table = Table(
        f"2. {tasks} CPU-bound tasks of {secs(single)} each ({CORES} workers, best of {repeats})",
        ["name", "wall (best)", "efficiency", "ratio to fastest peer", "target ≥ 0.95"],
    )
    for name, took in times.items():
        eff = tasks * single / (took * CORES)
        target = verdict(eff, 0.95, at_least=True) if name.startswith("escala") else ""
        if target:
            table.targets.append((f"{name} efficiency ≥ 0.95", f"{eff:.3f}", target))
        table.rows.append([name, secs(took), f"{eff:.3f}", f"{took / fastest:.2f}×", target])
    table.notes += [
        f"spin({n:,}) takes {secs(single)} in the parent (best of the calibration and of "
        "one run per round); "
        f"ideal wall = {tasks} × that / {CORES} cores = {secs(tasks * single / CORES)}.",
        "efficiency = (tasks × single-task time) / (wall × usable cores); pool start-up and "
        "shutdown are inside the wall time for every row.",
    ]
    return table


# -- workload 3: 1,000 tasks that block 50 ms ------------------------------------------


def bench_blocking(n: int, repeats: int) -> Table:
    items = list(range(n))

    def tpe() -> list[Any]:
        with cf.ThreadPoolExecutor(max_workers=n) as ex:
            return list(ex.map(block, items))

    def bare_threads() -> list[Any]:
        threads = [threading.Thread(target=block, args=(x,)) for x in items]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return items

    with escala.Pool("threads", n) as pool:
        pool.map(block, items)  # start its threads before timing
        times = best_each(
            {
                f"escala.map(mode='threads', workers={n})": lambda: escala.map(
                    block, items, mode="threads", workers=n
                ),
                f"escala.Pool('threads', {n}).map (warm)": lambda: pool.map(block, items),
                f"escala.map(async fn, mode='async', workers={n})": lambda: escala.map(
                    ablock, items, mode="async", workers=n
                ),
                f"ThreadPoolExecutor(max_workers={n}).map": tpe,
                f"{n} × threading.Thread start + join (no pool, the floor)": bare_threads,
            },
            repeats,
            items,
        )

    async def in_loop() -> None:
        sem = asyncio.Semaphore(n)

        async def guarded(x: Any) -> Any:
            async with sem:
                return await ablock(x)

        runs = {
            f"await escala.amap(async fn, limit={n})": lambda: escala.amap(ablock, items, limit=n),
            f"asyncio.gather + Semaphore({n})": lambda: asyncio.gather(*map(guarded, items)),
        }
        for _ in range(repeats):  # in turn, as best_each does
            for name, fn in runs.items():
                times[name] = min(times.get(name, float("inf")), await abest(fn, 1, items))

    asyncio.run(in_loop())
    table = Table(
        f"3. {n:,} tasks blocking {secs(SLEEP)} (best of {repeats}; ideal {secs(SLEEP)})",
        ["name", "wall (best)", "ratio to ideal", "target"],
    )
    for name, took in times.items():
        target = ""
        if name.startswith(("escala", "await escala")):
            limit, what = (2, "threads") if "threads" in name else (1.2, "async")
            target = verdict(took, limit * SLEEP)
            table.targets.append((f"{name} within {limit}× ideal ({what})", secs(took), target))
        table.rows.append([name, secs(took), f"{took / SLEEP:.2f}×", target])
    table.notes += [
        "Thread pools are created and shut down inside the timing, except the warm Pool row; "
        "the amap and gather rows are timed inside an already running event loop, "
        "escala.map(mode='async') starts and closes its own event loop inside the timing. "
        f"The last thread row starts one bare thread per task: what {n} threads cost here.",
    ]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    parser.add_argument("--markdown", metavar="PATH", help="write the results section here")
    parser.add_argument("--only", default="1,2,3,4", help="workloads to run, e.g. 1,3")
    args = parser.parse_args()
    quick = args.quick
    wanted = {int(part) for part in args.only.split(",")}
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    if os.environ.get("PYTHONPATH"):  # escala may come from elsewhere than src/
        command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {command}"
    header = [
        f"- Machine: {machine_line()}",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
    ]
    print("\n".join(header) + "\n")
    workloads: dict[int, Callable[[], Table]] = {
        1: lambda: bench_trivial(20_000 if quick else 100_000, 3 if quick else 7),
        2: lambda: bench_cpu(16, 0.1 if quick else 0.25, 2 if quick else 5),
        3: lambda: bench_blocking(1000, 3 if quick else 7),
        4: lambda: bench_memory(1_000_000 if quick else 10_000_000, 1 if quick else 3),
    }
    tables = []
    for key, run in workloads.items():
        if key in wanted:
            tables.append(run())
            show(tables[-1])
    for target, got, result in (t for table in tables for t in table.targets):
        print(f"{result:>16}  {target}: {got}")
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(tables, header))
    warn_stray_children()


if __name__ == "__main__":
    main()
