"""Measuring and reporting helpers shared by the benchmark scripts in this folder."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import escala

__all__ = [
    "Table",
    "abest",
    "best",
    "best_each",
    "machine_line",
    "markdown",
    "secs",
    "show",
    "verdict",
]


@dataclass
class Table:
    """One workload's results: rows of text, notes under them, and target verdicts."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[tuple[str, str, str]] = field(default_factory=list)  # target, got, verdict


def best(
    fn: Callable[[], Any], repeats: int, expect: Any = None, setup: Callable[[], Any] | None = None
) -> float:
    """Return the shortest of ``repeats`` timed calls of ``fn`` (``setup`` runs untimed).

    Raises:
        AssertionError: a call returned something other than ``expect`` (when given).
    """
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if expect is not None and out != expect:
            raise AssertionError(f"wrong results from {fn}")
    return min(times)


def best_each(
    runs: dict[str, Callable[[], Any]],
    repeats: int,
    expect: Any = None,
    setup: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, float]:
    """Like :func:`best` for several contenders, taken in turn, one repeat of each per round.

    Interleaving spreads a noisy neighbour's bursts over every contender instead of
    letting one of them take a whole burst.
    """
    times: dict[str, float] = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            before = (setup or {}).get(name)
            times[name] = min(times[name], best(fn, 1, expect, before))
    return times


async def abest(fn: Callable[[], Awaitable[Any]], repeats: int, expect: Any) -> float:
    """The same as :func:`best` for an awaitable, timed inside the running loop."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = await fn()
        times.append(time.perf_counter() - start)
        if out != expect:
            raise AssertionError(f"wrong results from {fn}")
    return min(times)


def verdict(value: float, limit: float, *, at_least: bool = False) -> str:
    """Return 'met', or how far ``value`` falls short of ``limit`` in percent of the limit."""
    if (value >= limit) if at_least else (value <= limit):
        return "met"
    miss = (limit - value) / limit if at_least else value / limit - 1
    return f"missed by {miss:.1%}"


def secs(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def machine_line() -> str:
    """CPU model, cores, memory, Python, OS and the versions of escala and its peers."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    libs = ", ".join(f"{name} {version(name)}" for name in ("joblib", "mpire", "psutil"))
    return (
        f"{model}, {os.cpu_count()} CPUs ({escala.usable_cpus()} usable per "
        f"escala.usable_cpus()), {mem:.0f} GiB; Python {platform.python_version()} on "
        f"{platform.platform()}; escala {escala.__version__} ({escala_source()}), {libs}"
    )


def escala_source() -> str:
    """Where escala was imported from, with its git revision and uncommitted files if any."""
    where = Path(escala.__file__).resolve().parent
    git = ["git", "-C", str(where)]
    try:
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], **_QUIET).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--", "."], **_QUIET).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"from {where} (not a git checkout)"
    changed = [line[3:] for line in status.splitlines()]
    return f"from {where} at git {rev}" + (
        f", uncommitted changes in {', '.join(changed)}" if changed else ", no uncommitted changes"
    )


_QUIET: Any = {"capture_output": True, "text": True, "check": True}


def show(table: Table) -> None:
    """Print ``table`` with rich, its notes under it."""
    from rich.console import Console
    from rich.table import Table as RichTable

    rich_table = RichTable(title=table.title, title_justify="left")
    for i, column in enumerate(table.columns):
        rich_table.add_column(column, justify="left" if i == 0 else "right")
    for row in table.rows:
        rich_table.add_row(*row)
    console = Console(width=max(180, Console().width))
    console.print(rich_table)
    for note in table.notes:
        console.print(f"  [dim]{note}[/dim]", highlight=False)
    console.print()


def markdown(tables: list[Table], header: list[str]) -> str:
    """Return the results section: header lines, each table with its notes, the targets."""
    lines = ["## Results", "", *header, ""]
    for table in tables:
        lines += [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(table.columns) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines += ["", *(f"- {note}" for note in table.notes), ""]
    lines += ["### Targets", "", "| target | measured | verdict |", "|---|---:|---|"]
    lines += [f"| {t} | {got} | {v} |" for table in tables for t, got, v in table.targets]
    return "\n".join(lines) + "\n"


def warn_stray_children() -> None:
    """Say so when a benchmark leaves a child process running (the resource tracker aside)."""
    import psutil

    stray = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                stray.append(child.pid)
        except psutil.Error:
            pass  # it exited meanwhile
    if stray:
        print(f"warning: child processes still running: {stray}")
