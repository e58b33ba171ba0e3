"""Showing comparisons: a rich table, the advisor's explanations, a PNG chart, and JSON.

Nothing here runs work; everything reads :class:`~._measure.Comparison` objects. matplotlib
is imported inside :func:`save_chart` only, so that importing :mod:`escala.bench` (and the
CLI) stays quick.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from .._worker.cpu import usable_cpus
from ._measure import Comparison, RunResult, Status

__all__ = ["explanations", "save_chart", "table", "to_json"]

_COLORS = {
    "sequential": "#7f7f7f",
    "threads": "#1f77b4",
    "processes": "#ff7f0e",
    "async": "#2ca02c",
    "auto": "#9467bd",
}
_FASTEST = "★"
_NOTE_WIDTH = 30


def table(comparisons: Sequence[Comparison]) -> Table:
    """Return one row per workload and mode, the fastest mode of each workload starred.

    Columns: workers, wall time, speed-up over sequential, speed-up per core the mode can
    use, share of the machine's CPU kept busy, peak memory of the process tree, and a note
    when a run failed, gave wrong results or was skipped. The auto row names the mode
    chosen. Fits an 80-column terminal.
    """
    cores = _cores(comparisons)
    notes = any(run.error or run.status is Status.WRONG for c in comparisons for run in c.results)
    out = Table(
        title=f"Each mode on this machine ({cores} usable cores)",
        caption=f"{_FASTEST} fastest correct run · speed-up against sequential · "
        "eff. = speed-up per core the mode can use · CPU = share of all cores kept busy · "
        "MB = peak memory of all processes · — = the mode does not apply "
        "(no async form of the work)",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    out.add_column("workload", no_wrap=True)
    out.add_column("mode", no_wrap=True)
    for header in ("workers", "wall", "speed-up", "eff.", "CPU", "MB"):
        out.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    if notes:
        out.add_column("note", max_width=_NOTE_WIDTH)
    for comparison in comparisons:
        fastest = comparison.fastest()
        for row, run in enumerate(comparison.results):
            figures = comparison.figures(run)
            star = run is fastest
            label = run.mode
            if run.advice is not None:
                label = f"auto→{run.advice.mode}"
            if star:
                label += f" {_FASTEST}"
            cells: list[str | Text] = [
                Text(comparison.workload, style="bold") if row == 0 else "",
                Text(label, style="bold green" if star else ""),
                str(run.workers) if run.workers and run.ran else "—",
                _seconds(run.wall) if run.ran or run.status is Status.FAILED else "—",
                _times(figures.speedup),
                _number(figures.efficiency),
                _percent(figures.cpu_use),
                _megabytes(run.peak_rss) if run.ran else "—",
            ]
            if notes:
                cells.append(_note(run))
            out.add_row(*cells, end_section=row == len(comparison.results) - 1)
    return out


def explanations(comparisons: Sequence[Comparison]) -> list[str]:
    """Return, per workload that ran in auto mode, what the advisor measured and chose."""
    lines = []
    for comparison in comparisons:
        advice = comparison.advice
        if advice is not None:
            lines.append(f"{comparison.title} ({comparison.workload}): {advice.explain()}")
    return lines


def save_chart(comparisons: Sequence[Comparison], path: str | os.PathLike[str]) -> Path:
    """Draw each mode's speed-up over sequential, grouped by workload, into a PNG file.

    Bars start at 1× and go up for a speed-up, down for a slow-down (log scale), with lines
    at 1× and at the number of usable cores: what parallel computing alone can reach.

    Returns:
        The path written.

    Raises:
        ValueError: ``comparisons`` is empty.
    """
    if not comparisons:
        raise ValueError("no comparisons to draw")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    target = Path(path)
    cores = _cores(comparisons)
    # Sequential is the 1× line itself: a bar of height zero would only crowd the groups.
    modes = [
        mode
        for mode in dict.fromkeys(run.mode for c in comparisons for run in c.results)
        if mode != "sequential"
    ]
    figure = Figure(figsize=(12, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # a canvas of our own: pyplot's global state is never touched
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        offset = (j - (len(modes) - 1) / 2) * width
        xs, ys, missing = [], [], []
        for i, comparison in enumerate(comparisons):
            run = comparison.result(mode)
            speedup = comparison.figures(run).speedup if run is not None else None
            if speedup is not None:
                xs.append(i + offset)
                ys.append(speedup)
            elif run is not None:
                missing.append(i + offset)
        bars = axes.bar(
            xs, [y - 1 for y in ys], width, bottom=1, label=mode, color=_COLORS.get(mode)
        )
        axes.bar_label(bars, labels=[_times(y) for y in ys], fontsize=7, padding=2)
        for x in missing:
            axes.text(x, 1.08, "n/a", ha="center", va="bottom", fontsize=7, color="#555555")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
    low, high = axes.get_ylim()
    axes.set_ylim(min(low, 0.5) / 1.5, max(high, cores) * 1.8)  # room for the bar labels
    # The two lines are named in the right margin, where no bar can hide their names.
    margin = axes.get_yaxis_transform()
    axes.axhline(1, color="black", linewidth=1)
    axes.text(1.005, 1, "1×\nsequential", transform=margin, va="center", fontsize=8)
    axes.axhline(cores, color="#d62728", linewidth=1, linestyle="--")
    axes.text(
        1.005,
        cores,
        f"{cores}×\n{cores} cores",
        transform=margin,
        va="center",
        fontsize=8,
        color="#d62728",
    )
    axes.set_xticks(
        range(len(comparisons)), [f"{c.title}\n{c.workload}" for c in comparisons], fontsize=8
    )
    axes.set_xlim(-0.5, len(comparisons) - 0.5)
    axes.set_xlabel("workload")
    axes.set_ylabel("speed-up over sequential (log scale; higher is faster)")
    axes.set_title(f"escala: speed-up of each mode over sequential, {cores} usable CPU cores")
    figure.legend(title="mode", ncols=max(1, len(modes)), loc="outside lower center", fontsize=9)
    axes.grid(axis="y", which="major", alpha=0.3)
    figure.savefig(target, format="png")
    return target


def to_json(comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """Return every figure of every run as plain data, for ``--json``."""
    return {
        "machine": {
            "cores": _cores(comparisons),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "workloads": [_comparison_json(c) for c in comparisons],
    }


def _comparison_json(comparison: Comparison) -> dict[str, Any]:
    fastest = comparison.fastest()
    return {
        "name": comparison.workload,
        "title": comparison.title,
        "expected": comparison.expected,
        "explanation": comparison.explanation,
        "scale": comparison.scale,
        "fastest": fastest.mode if fastest is not None else None,
        "runs": [_run_json(comparison, run) for run in comparison.results],
    }


def _run_json(comparison: Comparison, run: RunResult) -> dict[str, Any]:
    figures = comparison.figures(run)
    advice = None
    if run.advice is not None:
        advice = {
            "mode": run.advice.mode,
            "workers": run.advice.workers,
            "batch": run.advice.batch,
            "speedup": run.advice.speedup,
            "reason": run.advice.reason.value,
            "explanation": run.advice.explain(),
        }
    return {
        "mode": run.mode,
        "status": run.status.value,
        "workers": run.workers,
        "wall_s": run.wall,
        "cpu_s": run.cpu,
        "peak_rss_bytes": run.peak_rss,
        "correct": run.correct,
        "error": run.error,
        "skipped": run.skipped,
        "speedup": figures.speedup,
        "efficiency": figures.efficiency,
        "cpu_use": figures.cpu_use,
        "advice": advice,
    }


# -- cells ----------------------------------------------------------------------------


def _cores(comparisons: Sequence[Comparison]) -> int:
    return comparisons[0].cores if comparisons else usable_cpus()


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _times(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}×" if value < 10 else f"{value:.0f}×"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _megabytes(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def _note(run: RunResult) -> Text:
    if run.error is not None:
        return Text(f"failed: {_shorten(run.error)}", style="red")
    if run.skipped is not None:
        return Text(run.skipped, style="dim")
    if run.status is Status.WRONG:
        return Text("results differ from sequential!", style="bold red")
    return Text("")


def _shorten(text: str) -> str:
    line = text.splitlines()[0] if text else text
    return line if len(line) <= _NOTE_WIDTH else line[: _NOTE_WIDTH - 1] + "…"
