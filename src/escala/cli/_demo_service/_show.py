"""Showing ``escala demo --service``: figures, tables with their lessons, the chart, JSON.

Nothing here measures. The figures are taken once from what :mod:`._demo_service`
measured; the tables, the lesson under each, the chart and the JSON all read those same
figures. Every sentence is built from them, and says what was measured even where that is
not the expected lesson (on a loaded machine, say).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import textwrap
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ... import __version__, usable_cpus
from ...load import LoadReport, Verdict
from ...load._show import duration_text
from ._figures import HEALTH_RATE, IO_LIMIT, NAP, OVERLOAD_NAP, TIMEOUT

if TYPE_CHECKING:
    from ._figures import LoopLag, Results

__all__ = [
    "Admission",
    "Placement",
    "Round",
    "admissions",
    "offload_view",
    "overload_view",
    "placements",
    "plain",
    "rounds",
    "simultaneous_view",
    "span",
]

# Inside a figure, "52.5 ms" must not be split over two lines when a lesson wraps.
_GLUE = "\u00a0"
# (b) a probe this late (seconds) found the loop blocked; an edge of the server's buckets,
# so that the share of such probes is exact
LATE = 0.010


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _t(ms: float) -> str:
    """Return a latency in ms as people read it, glued to its unit."""
    return duration_text(ms / 1e3).replace(" ", _GLUE)


def span(bucket_ms: tuple[float, float]) -> str:
    """Return a histogram bucket given in ms as ``25–50 ms``, ``< 0.1 ms`` or ``> 30 s``."""
    lower, upper = bucket_ms
    if math.isinf(upper):
        return f">{_GLUE}{lower / 1e3:g}{_GLUE}s"
    unit, factor = ("ms", 1.0) if upper < 1000 else ("s", 1e-3)
    if lower <= 0:
        return f"<{_GLUE}{upper * factor:g}{_GLUE}{unit}"
    return f"{lower * factor:g}–{upper * factor:g}{_GLUE}{unit}"


# -- figures ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Round:
    """(a) one run of the comparison; latencies in ms."""

    name: str
    in_flight: int
    answered: int
    failed: int  # answers that were not 2xx
    wall_s: float
    throughput: float
    mean_ms: float
    p99_ms: float
    littles_l: float  # throughput × mean latency: requests in flight, by Little's law
    problems: list[str]  # why the generator's figures cannot be trusted; empty when they can


@dataclasses.dataclass(frozen=True)
class Placement:
    """(b) one placement of the CPU task, the /healthz probe beside it; latencies in ms."""

    task: str
    runs_on: str
    throughput: float
    failed: int
    task_p50_ms: float
    task_p99_ms: float
    health_p99_ms: float
    health_max_ms: float
    lag_probes: int
    lag_mean_ms: float
    lag_p99_ms: tuple[float, float]  # the histogram bucket that holds it
    lag_max_ms: tuple[float, float]
    lag_late_share: float  # of the probes, those over LATE late (a bucket edge: exact)
    lag_buckets: dict[str, int]  # probes at or below each edge (ms), cumulative
    problems: list[str]


@dataclasses.dataclass(frozen=True)
class Admission:
    """(c) one server offered more than it can serve; latencies in ms."""

    admission: bool
    offered: float
    sent: int
    ok: int
    goodput: float  # 2xx answers per second, from the first send to the last answer
    p50_ms: float
    p99_ms: float
    refused_503: int
    refused_429: int
    timeouts: int
    other: int  # other statuses and connection errors
    per_second: list[dict[str, float]]  # by intended send time: counts, 2xx p50 and p99
    problems: list[str]


def rounds(results: Results) -> list[Round]:
    """Return the runs of (a), one after another first."""
    comparison = results.simultaneous
    if comparison is None:
        return []
    rows = [("one after another", 1, comparison.one_by_one)]
    if comparison.together is not None:
        rows.append(("simultaneously", comparison.concurrency, comparison.together))
    return [
        Round(
            name=name,
            in_flight=width,
            answered=report.recorder.answered,
            failed=report.recorder.answered - report.outcomes[Verdict.OK],
            wall_s=round(report.elapsed, 3),
            throughput=round(report.throughput, 2),
            mean_ms=_ms(report.ok.mean),
            p99_ms=_ms(report.ok.percentile(99)),
            littles_l=round(report.throughput * report.ok.mean, 2),
            problems=report.problems,
        )
        for name, width, report in rows
    ]


def placements(results: Results) -> list[Placement]:
    """Return the phases of (b), the process pool first."""
    return [
        Placement(
            task=phase.task,
            runs_on=phase.runs_on,
            throughput=round(phase.work.throughput, 2),
            failed=phase.work.recorder.answered - phase.work.outcomes[Verdict.OK],
            task_p50_ms=_ms(phase.work.ok.percentile(50)),
            task_p99_ms=_ms(phase.work.ok.percentile(99)),
            health_p99_ms=_ms(phase.health.ok.percentile(99)),
            health_max_ms=_ms(phase.health.ok.max),
            lag_probes=phase.lag.probes,
            lag_mean_ms=_ms(phase.lag.mean),
            lag_p99_ms=_bucket_ms(phase.lag, phase.lag.p99),
            lag_max_ms=_bucket_ms(phase.lag, phase.lag.max),
            lag_late_share=_late_share(phase.lag),
            lag_buckets={f"{edge * 1e3:g}": n for edge, n in phase.lag.buckets.items()},
            problems=phase.work.problems + phase.health.problems,
        )
        for phase in results.offload
    ]


def _late_share(lag: LoopLag) -> float:
    if not lag.probes:
        return 0.0
    on_time = lag.buckets.get(LATE, lag.probes)
    return round(1 - on_time / lag.probes, 4)


def _bucket_ms(lag: LoopLag, bucket: tuple[float, float]) -> tuple[float, float]:
    if not lag.probes:
        return 0.0, 0.0
    return bucket[0] * 1e3, bucket[1] * 1e3


def admissions(results: Results) -> list[Admission]:
    """Return the phases of (c), admission control on first."""
    return [_admission(phase.admission, phase.report) for phase in results.overload]


def _admission(admission: bool, report: LoadReport) -> Admission:
    outcomes = report.outcomes
    ok = outcomes[Verdict.OK]
    return Admission(
        admission=admission,
        offered=report.spec.rate or 0.0,
        sent=report.sent,
        ok=ok,
        goodput=round(ok / report.elapsed, 2) if report.elapsed > 0 else 0.0,
        p50_ms=_ms(report.ok.percentile(50)),
        p99_ms=_ms(report.ok.percentile(99)),
        refused_503=outcomes[Verdict.UNAVAILABLE],
        refused_429=outcomes[Verdict.TOO_MANY],
        timeouts=outcomes[Verdict.TIMEOUT],
        other=outcomes[Verdict.OTHER] + outcomes[Verdict.CONNECTION],
        per_second=[
            {
                "start_s": second.start,
                "sent": second.counts["sent"],
                "2xx": second.counts["2xx"],
                "503": second.counts["503"],
                "timeout": second.counts["timeout"],
                "p50_ms": _ms(second.latency()["p50"]),
                "p99_ms": _ms(second.latency()["p99"]),
            }
            for second in report.timeline()
        ],
        problems=report.problems,
    )


# -- tables and lessons -----------------------------------------------------------------


class _Lesson:
    """A lesson under a table, wrapped to the terminal between words, never inside a figure.

    rich wraps at any space, the one inside ``52.5 ms`` too; ``textwrap`` keeps the glue.
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        width = max(40, options.max_width)
        lines = textwrap.wrap(self.text, width, initial_indent="→ ", subsequent_indent="  ")
        for line in lines:
            yield Text(line.replace(_GLUE, " "), "bold")


def plain(text: str) -> str:
    """Return a lesson as plain text, for JSON."""
    return text.replace(_GLUE, " ")


def _table(title: str) -> Table:
    return Table(box=box.SIMPLE_HEAD, padding=(0, 1), title=title, title_justify="left")


def _warnings(name: str, report_problems: list[str], failed: int = 0) -> list[Text]:
    out = []
    if failed:
        out.append(Text(f"{name}: {failed:,} answers were not 2xx", "yellow"))
    if report_problems:
        # the load package's wording advises its command-line flags; here only the fact
        fact = "; ".join(problem.split(" (")[0] for problem in report_problems)
        out.append(
            Text(
                f"{name}: the load generator fell behind ({fact}), so these latencies "
                "include its own delay: is this machine busy with other work?",
                "yellow",
            )
        )
    return out


def simultaneous_view(results: Results) -> RenderableType:
    """Return table (a) and its lesson."""

    rows = rounds(results)
    comparison = results.simultaneous
    assert comparison is not None
    table = _table(
        f"(a) I/O-bound: {comparison.count} requests to nap({NAP:g}), "
        f"one after another vs {comparison.concurrency} at a time"
    )
    table.add_column("", no_wrap=True)
    for header in ("in flight", "wall", "req/s", "mean", "p99", "λ × W"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row.name,
            f"{row.in_flight}",
            f"{row.wall_s:.2f} s",
            f"{row.throughput:,.1f}",
            _t(row.mean_ms),
            _t(row.p99_ms),
            f"{row.littles_l:.1f}",
        )
    warnings = [w for row in rows for w in _warnings(row.name, row.problems, row.failed)]
    note = Text("λ × W: throughput × mean latency, which Little's law says is in flight.", "dim")
    return Group(Text(), table, note, *warnings, _Lesson(simultaneous_lesson(rows)))


def simultaneous_lesson(rows: list[Round]) -> str:
    """Say what (a) measured, from its figures."""
    if len(rows) < 2:
        return "Only the first run was measured."
    one, many = rows
    speedup = many.throughput / one.throughput if one.throughput else 0.0
    stretch = many.mean_ms / one.mean_ms if one.mean_ms else 0.0
    law = (
        f"Little's law: {many.littles_l:.1f} in flight = {many.throughput:,.0f}/s × "
        f"{_t(many.mean_ms)}."
    )
    if speedup >= 1.5 and stretch < 1.5:
        return (
            f"{many.in_flight} at a time: ×{speedup:.1f} the throughput, and each request "
            f"took about as long ({_t(one.mean_ms)} vs {_t(many.mean_ms)}): the waits "
            f"overlapped instead of adding up. {law}"
        )
    if speedup >= 1.5:
        return (
            f"{many.in_flight} at a time: ×{speedup:.1f} the throughput, but each request "
            f"took ×{stretch:.1f} as long ({_t(one.mean_ms)} vs {_t(many.mean_ms)}): "
            f"something was saturated. {law}"
        )
    return (
        f"{many.in_flight} at a time gave only ×{speedup:.1f} the throughput here, each "
        f"request ×{stretch:.1f} as long: this machine could not overlap them. {law}"
    )


def offload_view(results: Results) -> RenderableType:
    """Return table (b) and its lesson."""

    rows = placements(results)
    table = _table(
        f"(b) CPU-bound: fib({results.fib_n}), {_t(results.call_seconds * 1e3)} a call, "
        f"{results.offload_rate:.0f}/s for {results.offload_duration:g} s; /healthz "
        f"{HEALTH_RATE:g}/s beside"
    )
    table.add_column("task", no_wrap=True)
    for header in ("req/s", "task\np99", "/healthz\np99"):
        table.add_column(header, justify="right", no_wrap=True)
    for header in ("loop lag\np99", "loop lag\nmax", f"> {LATE * 1e3:g} ms\nlate"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row.task,
            f"{row.throughput:,.1f}",
            _t(row.task_p99_ms),
            _t(row.health_p99_ms),
            span(row.lag_p99_ms),
            span(row.lag_max_ms),
            f"{row.lag_late_share:.0%}",
        )
    workers = f"{results.cpu_workers} worker{'s' if results.cpu_workers != 1 else ''}"
    note = Text(
        f"fib runs in the server's process pool ({workers}), fib_on_loop on its event loop. "
        "Loop lag: how late that loop ran its 20 ms timer, from the server's /metrics "
        "histogram (ranges: its buckets); last column: the share of ticks over "
        f"{LATE * 1e3:g} ms late.",
        "dim",
    )
    warnings = [w for row in rows for w in _warnings(row.task, row.problems, row.failed)]
    return Group(Text(), table, note, *warnings, _Lesson(offload_lesson(rows)))


def offload_lesson(rows: list[Placement]) -> str:
    """Say what (b) measured, from its figures."""
    if len(rows) < 2:
        return "Only one placement was measured."
    pool, loop = rows
    health = f"/healthz p99 {_t(pool.health_p99_ms)} vs {_t(loop.health_p99_ms)}"
    late = (
        f"the loop's timer was over {LATE * 1e3:g}{_GLUE}ms late in "
        f"{pool.lag_late_share:.0%} of its ticks vs {loop.lag_late_share:.0%}"
    )
    if (
        loop.health_p99_ms > 2 * pool.health_p99_ms
        and loop.lag_late_share > 2 * pool.lag_late_share
    ):
        return (
            f"In the process pool, the same work left the event loop free: {health}, and "
            f"{late}. On the loop, every other request waits while a "
            f"{_t(loop.task_p50_ms)} call runs: CPU work belongs in a process."
        )
    return (
        f"This run shows no clear difference ({health}; {late}): on a busy machine the "
        "pool's process competes with the event loop for the cores."
    )


def overload_view(results: Results) -> RenderableType:
    """Return table (c) and its lesson."""

    rows = admissions(results)
    offered = rows[0].offered if rows else 0.0
    table = _table(
        f"(c) Overload: nap({OVERLOAD_NAP:g}), {IO_LIMIT} at once (capacity "
        f"{IO_LIMIT / OVERLOAD_NAP:.0f}/s), offered {offered:.0f}/s for "
        f"{results.overload_duration:g} s"
    )
    table.add_column("admission", no_wrap=True)
    for header in ("sent", "goodput", "2xx p50", "2xx p99", "503", "429", "timeouts"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            "on" if row.admission else "off",
            f"{row.sent:,}",
            f"{row.goodput:,.1f}/s",
            _t(row.p50_ms),
            _t(row.p99_ms),
            f"{row.refused_503:,}",
            f"{row.refused_429:,}",
            Text(f"{row.timeouts:,}", "red" if row.timeouts else ""),
        )
    note = Text(
        "Goodput: 2xx answers per second, from the first send to the last answer. "
        f"Latency from each request's intended send time (open model); timeout {TIMEOUT:g} s.",
        "dim",
    )
    warnings = [
        w
        for row in rows
        for w in _warnings(f"admission {'on' if row.admission else 'off'}", row.problems)
    ]
    warnings += [
        Text(f"admission {'on' if r.admission else 'off'}: {r.other:,} other failures", "yellow")
        for r in rows
        if r.other
    ]
    return Group(Text(), table, note, *warnings, _Lesson(overload_lesson(rows)))


def overload_lesson(rows: list[Admission]) -> str:
    """Say what (c) measured, from its figures."""
    if len(rows) < 2:
        return "Only one server was measured."
    on, off = rows
    refused = on.refused_503 + on.refused_429
    answered = [s for s in off.per_second if s["2xx"]]
    growth = ""
    if len(answered) >= 2 and answered[-1]["p50_ms"] > 2 * answered[0]["p50_ms"]:
        growth = (
            f"; the queue grew, and latency with it: 2xx p50 {_t(answered[0]['p50_ms'])} for "
            f"requests sent in the first second, {_t(answered[-1]['p50_ms'])} in second "
            f"{answered[-1]['start_s'] + 1:g}"
        )
    timeouts = f"; {off.timeouts:,} timed out" if off.timeouts else ""
    goodput = f"Goodput {on.goodput:,.0f}/s with admission control, {off.goodput:,.0f}/s without."
    if refused and on.p99_ms < off.p99_ms / 2:
        return (
            f"Admission control refused {refused:,} requests at once and kept the accepted "
            f"ones fast (2xx p99 {_t(on.p99_ms)}). Without it nothing was refused{growth}"
            f"{timeouts}; 2xx p99 {_t(off.p99_ms)}. {goodput}"
        )
    return (
        f"Admission control refused {refused:,} requests, 2xx p99 {_t(on.p99_ms)}; without "
        f"it 2xx p99 {_t(off.p99_ms)}{growth}{timeouts}. {goodput}"
    )


# -- JSON and chart ---------------------------------------------------------------------


def to_json(results: Results) -> dict[str, Any]:
    """Return every figure of the demo as plain data, for ``--json``; latencies in ms."""
    comparison = results.simultaneous
    runs, kinds, servers = rounds(results), placements(results), admissions(results)
    return {
        "machine": {
            "line": results.machine,
            "escala": __version__,
            "python": platform.python_version(),
            "usable_cores": usable_cpus(),
            "platform": platform.platform(),
        },
        "scale": results.scale,
        "servers": results.servers,
        "simultaneous": {
            "count": comparison.count if comparison else 0,
            "concurrency": comparison.concurrency if comparison else 0,
            "speedup": round(comparison.speedup, 3) if comparison else 0.0,
            "runs": [dataclasses.asdict(row) for row in runs],
            "lesson": plain(simultaneous_lesson(runs)),
        },
        "offload": {
            "fib_n": results.fib_n,
            "call_ms": _ms(results.call_seconds),
            "rate": round(results.offload_rate, 3),
            "duration_s": results.offload_duration,
            "cpu_workers": results.cpu_workers,
            "placements": [dataclasses.asdict(row) for row in kinds],
            "lesson": plain(offload_lesson(kinds)),
        },
        "overload": {
            "duration_s": results.overload_duration,
            "servers": [dataclasses.asdict(row) for row in servers],
            "lesson": plain(overload_lesson(servers)),
        },
    }
