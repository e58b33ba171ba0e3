"""The chart of ``escala demo --service``: one PNG, a panel per scenario.

It reads the same figures as the tables (:mod:`._demo_service_show`); matplotlib is
imported only when a chart is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._figures import TIMEOUT
from ._show import Admission, Placement, Round, admissions, placements, plain, rounds, span

if TYPE_CHECKING:
    from ._figures import Results

__all__ = ["save_chart"]

_POOL, _LOOP = "#1565c0", "#c62828"
_ON, _OFF = "#2e7d32", "#c62828"


def save_chart(results: Results, path: str) -> Path:
    """Draw the three scenarios side by side into a PNG file; return its path.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # a canvas of our own: pyplot's global state is never touched
    figure.suptitle(
        f"escala demo --service · {results.machine} · measured on this machine", fontsize=10
    )
    first, second, third = figure.subplots(1, 3)
    _draw_simultaneous(first, rounds(results))
    _draw_offload(second, placements(results))
    _draw_overload(third, admissions(results))
    for axis in (first, second, third):
        axis.grid(True, axis="y", which="major", alpha=0.3)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target)
    return target


def _duration(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1e3:.3g} s"


def _log_ms(axis: Any) -> None:
    """A log axis of milliseconds labelled 1-2-5 in ms and s, not 6×10⁰ on the minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_yscale("log")
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(
        FuncFormatter(lambda v, _: f"{v:g} ms" if v < 1000 else f"{v / 1e3:g} s")
    )
    axis.yaxis.set_minor_formatter(NullFormatter())


def _draw_simultaneous(axis: Any, rows: list[Round]) -> None:
    bars = axis.bar(
        [row.name for row in rows], [row.throughput for row in rows], color=["#9e9e9e", _ON]
    )
    for bar, row in zip(bars, rows, strict=True):
        axis.annotate(
            f"{row.throughput:,.0f} requests/s\n{row.in_flight} in flight\n"
            f"each took {_duration(row.mean_ms)} (mean)",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    axis.set_ylim(0, max((row.throughput for row in rows), default=1) * 1.3)
    axis.set_ylabel("requests per second")
    axis.set_title("(a) I/O-bound: one after another vs simultaneously", fontsize=10)


def _draw_offload(axis: Any, rows: list[Placement]) -> None:
    names = ["task p99", "/healthz p99", "loop lag p99\n(a histogram bucket)"]
    width = 0.38
    values = [v for row in rows for v in (row.task_p99_ms, row.health_p99_ms, row.lag_p99_ms[1])]
    # bars on a log axis start somewhere: a decade under the smallest figure
    floor = 10 ** math.floor(math.log10(max(min(values, default=1.0), 0.01) / 2))
    for j, (row, color) in enumerate(zip(rows, (_POOL, _LOOP), strict=False)):
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        where = "in the process pool" if j == 0 else "on the event loop"
        for x, value in zip(xs[:2], (row.task_p99_ms, row.health_p99_ms), strict=True):
            axis.bar(x, value - floor, width, bottom=floor, color=color)
            axis.annotate(_duration(value), (x, value), ha="center", va="bottom", fontsize=8)
        # the server's lag is known to a bucket: drawn as that bucket, hatched
        lower, upper = row.lag_p99_ms
        axis.bar(
            xs[2], upper - max(lower, floor), width, bottom=max(lower, floor),
            color=color, alpha=0.45, hatch="//", edgecolor=color,
        )  # fmt: skip
        axis.annotate(
            plain(span(row.lag_p99_ms)), (xs[2], upper), ha="center", va="bottom", fontsize=8
        )
        axis.bar(0, 0, 0, color=color, label=f"{row.task}: {where}")  # the legend's entry
    _log_ms(axis)
    axis.set_ylim(floor, max(values, default=1.0) * 8)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("milliseconds (log scale)")
    axis.set_title("(b) CPU-bound: in the process pool vs on the event loop", fontsize=10)
    axis.legend(fontsize=8, loc="upper left")


def _draw_overload(axis: Any, rows: list[Admission]) -> None:

    for row, color in zip(rows, (_ON, _OFF), strict=False):
        name = f"admission {'on' if row.admission else 'off'}"
        answered = [s for s in row.per_second if s["2xx"]]
        axis.plot(
            [s["start_s"] + 0.5 for s in answered],
            [s["p99_ms"] for s in answered],
            marker="o",
            color=color,
            label=f"{name}: 2xx p99; goodput {row.goodput:,.0f}/s, "
            f"{row.refused_503:,} refused (503)",
        )
        late = [s for s in row.per_second if s["timeout"]]
        if late:
            axis.scatter(
                [s["start_s"] + 0.5 for s in late],
                [TIMEOUT * 1e3] * len(late),
                marker="x",
                s=60,
                color=color,
                zorder=3,
                label=f"{name}: sent in this second and timed out ({row.timeouts:,} in all)",
            )
    axis.axhline(TIMEOUT * 1e3, color="#777777", linestyle="--", linewidth=1)
    _log_ms(axis)
    top = max((s["p99_ms"] for row in rows for s in row.per_second), default=1.0)
    axis.set_ylim(top=max(top, TIMEOUT * 1e3) * 6)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("second of the run, by intended send time")
    axis.set_ylabel(f"latency (dashed: the client's {TIMEOUT:g} s timeout)")
    axis.set_title("(c) Overload, 3× capacity: admission control on vs off", fontsize=10)
    axis.legend(fontsize=8, loc="upper left")
