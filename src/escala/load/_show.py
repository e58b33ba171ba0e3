"""Showing a run: the terminal tables (rich), the live progress line, and the PNG chart.

Nothing here measures; everything reads a :class:`~._report.LoadReport`. matplotlib is
imported inside :func:`save_plot` only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ._compare import Comparison
from ._histogram import Histogram
from ._record import Verdict
from ._report import LAG_LIMIT, RATE_FLOOR, LoadReport, Second
from ._run import LoadProgress
from ._spec import Model

__all__ = ["comparison_table", "progress_line", "report_view", "save_plot"]

_TIMELINE_ROWS = 30


def duration_text(seconds: float) -> str:
    """Return a latency the way people read it: ``0.42 ms``, ``12.3 ms``, ``1.25 s``."""
    if seconds >= 1:
        return f"{seconds:,.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e3:.2f} ms"


def progress_line(where: LoadProgress, label: str = "") -> Text:
    """Return the live line: elapsed time, requests, outcomes, in flight."""
    c = where.counts
    rate = c.sent / where.elapsed if where.elapsed > 0 else 0.0
    text = Text()
    if label:
        text.append(f"{label} · ", style="bold")
    text.append(f"{min(where.elapsed, where.duration):.1f} of {where.duration:g} s", "bold")
    text.append(f" · sent {c.sent:,} ({rate:,.0f}/s) · ")
    text.append(f"2xx {c.ok:,}", "green")
    text.append(" · ")
    text.append(f"rejected {c.rejected:,}", "yellow" if c.rejected else "")
    text.append(" · ")
    text.append(f"failed {c.failed:,}", "red" if c.failed else "")
    if c.dropped:
        text.append(f" · dropped {c.dropped:,}", "red")
    text.append(f" · in flight {c.inflight:,}")
    return text


def report_view(report: LoadReport) -> RenderableType:
    """Return the whole report for the terminal: counts, latencies, timeline, verdict."""
    spec = report.spec
    parts: list[RenderableType] = []
    head = Text()
    head.append("escala load", "bold")
    head.append(f" · {spec.method} {spec.url}\n{spec.describe()} · ")
    head.append(f"{report.processes} process{'es' if report.processes != 1 else ''}")
    if report.interrupted:
        head.append(" · INTERRUPTED: partial figures", "bold yellow")
    parts.extend([head, Text()])
    parts.append(_counts_table(report))
    parts.append(_latency_table(report))
    seconds = report.timeline()
    if seconds:
        parts.append(_timeline_table(seconds))
    parts.extend(_notes(report))
    parts.append(_verdict(report))
    return Group(*parts)


def _counts_table(report: LoadReport) -> Table:
    spec = report.spec
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), title="Requests", title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("", overflow="fold")
    if spec.model is Model.OPEN:
        rate = f"{report.achieved_rate:,.1f}/s sent of {spec.rate:,.6g}/s asked"
    else:
        rate = f"{report.throughput:,.1f} answers/s from {spec.users} user(s)"
    table.add_row("sent", f"{report.sent:,}", "", rate)
    styles = {
        Verdict.OK: "green",
        Verdict.TOO_MANY: "yellow",
        Verdict.UNAVAILABLE: "yellow",
    }
    for outcome, count in report.outcomes.items():
        share = f"{count / report.sent:.1%}" if report.sent and count else ""
        note = ""
        if outcome is Verdict.OTHER and count:
            note = ", ".join(f"{s} ×{n:,}" for s, n in report.other_statuses.items())
        elif outcome.key in report.recorder.errors and count:
            note = report.recorder.errors[outcome.key]
        style = styles.get(outcome, "red") if count else "dim"
        table.add_row(Text(outcome.label, style), f"{count:,}", share, note)
    if spec.model is Model.OPEN:
        note = (
            f"due while all {spec.max_inflight:,} in-flight slots were taken: never sent"
            if report.dropped
            else f"in-flight cap {spec.max_inflight:,}"
        )
        table.add_row(
            Text("dropped", "red" if report.dropped else "dim"), f"{report.dropped:,}", "", note
        )
    if report.unfinished:
        table.add_row("unfinished", f"{report.unfinished:,}", "", "sent, cut off by Ctrl-C")
    return table


def _latency_table(report: LoadReport) -> Table:
    since = "intended send time" if report.spec.model is Model.OPEN else "actual send time"
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        title=f"Latency, from the {since}",
        title_justify="left",
    )
    table.add_column("", no_wrap=True)
    for header in ("count", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(header, justify="right", no_wrap=True)
    rows: list[tuple[str, Histogram]] = [("2xx", report.ok), ("429 / 503", report.rejected)]
    for name, histogram in rows:
        if not histogram.count:
            table.add_row(name, "0", *["—"] * 5, style="dim")
            continue
        figures = [duration_text(v) for v in histogram.summary().values()]
        table.add_row(name, f"{histogram.count:,}", *figures)
    return table


def _timeline_table(seconds: Sequence[Second]) -> Table:
    rows = _grouped(seconds, _TIMELINE_ROWS)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), title="Timeline", title_justify="left")
    for header in ("from", "sent", "2xx", "429/503", "failed", "dropped", "p50", "p99", "max"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        c = row.counts
        rejected = c["429"] + c["503"]
        failed = c["other"] + c["timeout"] + c["connection_error"]
        latency = row.latency()
        figures = [duration_text(v) for v in latency.values()] if row.ok is not None else ["—"] * 3
        table.add_row(
            f"{row.start:g} s",
            f"{c['sent']:,}",
            f"{c['2xx']:,}",
            Text(f"{rejected:,}", "yellow" if rejected else ""),
            Text(f"{failed:,}", "red" if failed else ""),
            Text(f"{c['dropped']:,}", "red" if c["dropped"] else ""),
            *figures,
        )
    return table


def _grouped(seconds: Sequence[Second], most: int) -> list[Second]:
    """Merge neighbouring buckets so that at most ``most`` remain (histograms added)."""
    size = math.ceil(len(seconds) / most)
    if size <= 1:
        return list(seconds)
    out = []
    for first in range(0, len(seconds), size):
        group = seconds[first : first + size]
        counts = {key: sum(s.counts[key] for s in group) for key in group[0].counts}
        parts = [s.ok for s in group if s.ok is not None]
        merged = Histogram.merged(parts, digits=2) if parts else None
        out.append(Second(group[0].start, sum(s.width for s in group), counts, merged))
    return out


def _notes(report: LoadReport) -> list[RenderableType]:
    notes: list[RenderableType] = []
    spec = report.spec
    lag = report.lag
    if lag.count:
        what = "sends left late by" if spec.model is Model.OPEN else "event loop woke late by"
        notes.append(
            Text(
                f"Generator: its {what} {duration_text(lag.percentile(50))} at p50, "
                f"{duration_text(lag.percentile(99))} at p99, {duration_text(lag.max)} at most.",
                "dim",
            )
        )
    if spec.model is Model.CLOSED:
        notes.append(
            Text(
                "Closed model: each user waits for its answer before sending again, so while "
                "the server stalls nobody sends, and a stall shows as one slow request per "
                "user. Give --rate for the open model, which keeps sending.",
                "dim",
            )
        )
    statuses = report.other_statuses
    if statuses and report.sent and max(statuses.values()) > report.sent / 2:
        common = next(iter(statuses))
        hint = {
            405: f"is -X needed? (this sent {spec.method})",
            401: "is --token KEY needed?",
            403: "does the key allow this?",
            404: "is the path right?",
        }.get(common)
        if hint:
            notes.append(Text(f"Most answers were {common}: {hint}", "yellow"))
    return notes


def _verdict(report: LoadReport) -> Text:
    problems = report.problems
    if problems:
        text = Text("NOT VALID: the generator fell behind (", "bold red")
        text.append("; ".join(problems), "red")
        text.append("). Its latencies include its own delays.", "bold red")
        return text
    spec = report.spec
    if spec.model is Model.OPEN:
        detail = (
            f"its sends were {duration_text(report.lag.percentile(99))} late at p99 "
            f"(limit {LAG_LIMIT * 1e3:g} ms) and it issued at least {RATE_FLOOR:.0%} of the "
            "scheduled rate"
        )
    else:
        detail = (
            f"its event loop was {duration_text(report.lag.percentile(99))} late at p99 "
            f"(limit {LAG_LIMIT * 1e3:g} ms)"
        )
    return Text(f"Valid: the generator kept up: {detail}.", "green")


def comparison_table(comparison: Comparison) -> RenderableType:
    """Return the two runs side by side, the speed-up, and Little's law."""
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        title=f"The same {comparison.count:,} requests, one after another, then "
        f"{comparison.concurrency} at a time",
        title_justify="left",
    )
    table.add_column("", no_wrap=True)
    for header in ("in flight", "answered", "wall", "requests/s", "mean", "p99", "speed-up"):
        table.add_column(header, justify="right", no_wrap=True)
    rows = [("one after another", 1, comparison.one_by_one, 1.0)]
    if comparison.together is not None:
        rows.append(
            (
                "simultaneously",
                comparison.concurrency,
                comparison.together,
                comparison.speedup,
            )
        )
    for name, width, report, speedup in rows:
        table.add_row(
            name,
            f"{width:,}",
            f"{report.recorder.answered:,}",
            f"{report.elapsed:,.2f} s",
            f"{report.throughput:,.1f}",
            duration_text(report.ok.mean),
            duration_text(report.ok.percentile(99)),
            Text(f"×{speedup:,.1f}", "bold green" if speedup > 1.5 else ""),
        )
    parts: list[RenderableType] = [table]
    failed = [
        (name, report)
        for name, _, report, _ in rows
        if report.recorder.outcomes[Verdict.OK] < report.recorder.answered
    ]
    for name, report in failed:
        bad = report.recorder.answered - report.recorder.outcomes[Verdict.OK]
        parts.append(Text(f"{name}: {bad:,} answers were not 2xx", "yellow"))
    if comparison.together is not None:
        parts.append(Text(f"Speed-up: ×{comparison.speedup:,.1f} the throughput.", "bold"))
    parts.append(Text(comparison.littles_law()))
    if comparison.interrupted:
        parts.append(Text("INTERRUPTED: partial figures", "bold yellow"))
    return Group(*parts)


def save_plot(report: LoadReport, path: str | os.PathLike[str]) -> Path:
    """Draw latency over time and the percentile spectrum into a PNG file.

    Left: per timeline bucket, p50, p99 and max of the 2xx latencies (log scale), over
    the requests sent per second. Right: the latency at every percentile of the whole run,
    on HdrHistogram's axis (1/(1 − p), log), for 2xx and for rejections.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'escala[demo]'``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    target = Path(path)
    figure = Figure(figsize=(12, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    over_time, spectrum = figure.subplots(1, 2, width_ratios=[3, 2])
    spec = report.spec
    since = "intended send" if spec.model is Model.OPEN else "actual send"
    figure.suptitle(
        f"escala load · {spec.method} {spec.url}\n{spec.describe()} · "
        f"{report.processes} process(es)"
        + ("" if report.valid else " · NOT VALID: the generator fell behind"),
        fontsize=10,
    )
    as_ms = FuncFormatter(
        lambda value, _: f"{value:.4g} ms" if value < 1000 else f"{value / 1e3:g} s"
    )

    seconds = report.timeline()
    counts = over_time.twinx()
    counts.set_zorder(0)
    over_time.set_zorder(1)
    over_time.patch.set_visible(False)
    if seconds:
        width = seconds[0].width
        middles = [s.start + width / 2 for s in seconds]
        sent = [s.counts["sent"] / width for s in seconds]
        counts.bar(middles, sent, width=width * 0.9, color="#dddddd", label="sent/s")
        rejected = [(s.counts["429"] + s.counts["503"]) / width for s in seconds]
        if any(rejected):
            counts.bar(middles, rejected, width=width * 0.9, color="#f5c26b", label="429+503/s")
        dropped = [s.counts["dropped"] / width for s in seconds]
        if any(dropped):
            counts.bar(
                middles,
                dropped,
                bottom=sent,
                width=width * 0.9,
                color="#f4a6a6",
                label="dropped/s",
            )
        counts.set_ylabel("requests per second")
        counts.set_ylim(0, max(max(sent), 1) * 1.15 + (max(dropped) if dropped else 0))
        for name, color in (("max", "#d62728"), ("p99", "#ff7f0e"), ("p50", "#1f77b4")):
            xs = [m for m, s in zip(middles, seconds, strict=True) if s.ok is not None]
            ys = [s.latency()[name] * 1e3 for s in seconds if s.ok is not None]
            over_time.plot(xs, ys, marker="o", markersize=3, color=color, label=f"2xx {name}")
    for axis in (over_time, spectrum):
        axis.set_yscale("log")
        # 1-2-5 steps labelled in ms, not matplotlib's 6×10⁰ on the minor ticks
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(as_ms)
        axis.yaxis.set_minor_formatter(NullFormatter())
    over_time.set_xlabel(f"seconds since the start (by {since} time)")
    over_time.set_ylabel(f"latency from the {since}")
    over_time.set_title("Latency over time", fontsize=10)
    over_time.grid(True, which="major", alpha=0.3)
    handles, labels = over_time.get_legend_handles_labels()
    more, more_labels = counts.get_legend_handles_labels()
    if handles or more:
        over_time.legend(handles + more, labels + more_labels, fontsize=8, loc="upper left")

    ticks = [0.0, 90.0, 99.0, 99.9, 99.99, 99.999]
    for name, histogram, color in (
        ("2xx", report.ok, "#1f77b4"),
        ("429 / 503", report.rejected, "#ff7f0e"),
    ):
        points = [(p, v) for p, v in histogram.spectrum() if p < 100]
        if not points:
            continue
        xs = [1 / (1 - p / 100) for p, _ in points]
        ys = [v * 1e3 for _, v in points]
        spectrum.plot(xs, ys, color=color, label=f"{name} ({histogram.count:,})")
        spectrum.plot([xs[-1]], [histogram.max * 1e3], marker="^", color=color)
    spectrum.set_xscale("log")
    spectrum.xaxis.set_major_locator(FixedLocator([1 / (1 - t / 100) for t in ticks]))
    spectrum.xaxis.set_major_formatter(
        FuncFormatter(lambda value, _: f"{100 - 100 / value:g}%" if value > 1 else "0%")
    )
    spectrum.xaxis.set_minor_locator(FixedLocator([]))
    spectrum.set_xlim(1, 1 / (1 - ticks[-1] / 100))
    spectrum.set_xlabel("percentile (▲ = max)")
    spectrum.set_ylabel(f"latency from the {since}")
    spectrum.set_title("Percentile spectrum", fontsize=10)
    spectrum.grid(True, which="major", alpha=0.3)
    if spectrum.get_legend_handles_labels()[0]:
        spectrum.legend(fontsize=8, loc="upper left")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target)
    return target
