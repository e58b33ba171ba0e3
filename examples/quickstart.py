"""escala in one minute: the same work run sequentially, on threads, on processes and on asyncio.

Run it with ``bash scripts/run demo`` (sets everything up), or ``python examples/quickstart.py``
once escala is installed. It measures two kinds of work on this machine:

* work that *waits* (here: 60 tasks that each wait 50 ms, as a network call would), where
  threads and asyncio overlap the waiting;
* work that *computes* (pure Python, holding the GIL), where only processes use more than
  one core.

Then it shows streaming with ``imap``, collected errors, and a timeout that really stops a
runaway task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

import escala

console = Console()


def wait_like_io(x: int) -> int:
    time.sleep(0.05)
    return x


async def await_like_io(x: int) -> int:
    await asyncio.sleep(0.05)
    return x


def compute(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def compare(title: str, runs: dict[str, Callable[[], Any]]) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("mode")
    table.add_column("wall time", justify="right")
    table.add_column("speed-up vs sequential", justify="right")
    times = {mode: timed(run) for mode, run in runs.items()}
    base = times["sequential"]
    for mode, seconds in times.items():
        table.add_row(mode, f"{seconds:.2f} s", f"{base / seconds:.1f}×")
    console.print(table)


def main() -> None:
    cores = escala.usable_cpus()
    console.print(f"[bold]escala {escala.__version__}[/bold] on {cores} usable core(s)\n")

    io_items = range(60)
    compare(
        "60 tasks that each wait 50 ms (I/O-bound)",
        {
            "sequential": lambda: escala.map(wait_like_io, io_items, mode="sequential"),
            "threads": lambda: escala.map(wait_like_io, io_items, mode="threads", workers=60),
            "processes": lambda: escala.map(wait_like_io, io_items, mode="processes"),
            "async": lambda: escala.map(await_like_io, io_items, mode="async", workers=60),
        },
    )
    console.print(
        "Waiting overlaps: threads and asyncio run all 60 waits at once. Processes help\n"
        f"only as far as their {cores} worker(s) can wait side by side.\n"
    )

    size = 1_500_000
    cpu_items = [size] * (2 * cores)
    compare(
        f"{len(cpu_items)} tasks of pure-Python arithmetic (CPU-bound)",
        {
            "sequential": lambda: escala.map(compute, cpu_items, mode="sequential"),
            "threads": lambda: escala.map(compute, cpu_items, mode="threads"),
            "processes": lambda: escala.map(compute, cpu_items, mode="processes"),
        },
    )
    console.print(
        "Python code holds the GIL: threads take turns on one core; processes use them all.\n"
    )

    console.print("[bold]Streaming[/bold]: results as they finish, from an endless generator")

    def naturals() -> Any:
        n = 0
        while True:
            yield n
            n += 1

    stream = escala.imap(compute, (1000 * n for n in naturals()), mode="processes", ordered=False)
    first = [next(stream) for _ in range(5)]
    stream.close()  # type: ignore[attr-defined]
    console.print(f"  first five results: {first}\n")

    console.print("[bold]Errors[/bold]: collect every outcome instead of stopping at the first")
    outcomes = escala.map(lambda x: 10 // x, [5, 2, 0, 1], mode="threads", errors="collect")
    for outcome in outcomes:
        shown = outcome.value if outcome.ok else f"{type(outcome.error).__name__}: {outcome.error}"
        console.print(f"  item {outcome.item!r} -> {shown}")

    console.print("\n[bold]Timeouts[/bold]: a runaway task is killed, the others finish")

    def maybe_forever(x: int) -> int:
        if x == 3:
            time.sleep(3600)
        return x

    outcomes = escala.map(maybe_forever, range(6), mode="processes", timeout=0.5, errors="collect")
    for outcome in outcomes:
        console.print(f"  {outcome.item} -> {outcome.value if outcome.ok else outcome.error}")


if __name__ == "__main__":
    main()
