"""The figures of a run: :class:`LoadReport`, its validity verdict, and its JSON form.

A report is made from the :class:`~._record.Recorder` of every generator process added
into one. Percentiles are read from the merged histograms, never averaged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._histogram import Histogram
from ._record import Column, Recorder, Verdict
from ._spec import LoadSpec, Model

__all__ = ["LAG_LIMIT", "RATE_FLOOR", "LoadReport", "Second"]

# A run is not valid when the generator itself was late: its sends (open model) or its
# event loop (closed model) more than 10 ms late at p99, or fewer than 95% of the
# scheduled requests issued per second.
LAG_LIMIT = 0.010
RATE_FLOOR = 0.95


@dataclasses.dataclass(frozen=True)
class Second:
    """One bucket of the timeline (a second, or wider for runs over ten minutes).

    Attributes:
        start: seconds after the run's start.
        width: seconds it covers.
        counts: sent, dropped, and one count per :class:`~._record.Verdict`.
        ok: latencies of its 2xx answers (2 significant digits), or ``None``.
    """

    start: float
    width: float
    counts: dict[str, int]
    ok: Histogram | None

    def latency(self) -> dict[str, float]:
        """Return p50, p99 and max of this bucket's 2xx latencies in seconds (0 if none)."""
        ok = self.ok or Histogram(digits=2)
        return {"p50": ok.percentile(50), "p99": ok.percentile(99), "max": ok.max}


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load run measured.

    Attributes:
        spec: what was asked.
        processes: generator processes that ran it.
        recorder: every process's counts and histograms, added up.
        planned_span: seconds the schedule meant to send for.
        interrupted: the run was stopped early (Ctrl-C): the figures are partial.
    """

    spec: LoadSpec
    processes: int
    recorder: Recorder
    planned_span: float
    interrupted: bool = False

    # -- counts -------------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Requests sent: the sum of the outcomes, plus :attr:`unfinished`."""
        return self.recorder.sent

    @property
    def dropped(self) -> int:
        """Requests due while the in-flight cap was reached, and so never sent."""
        return self.recorder.dropped

    @property
    def unfinished(self) -> int:
        """Requests sent and without an outcome: cancelled by an interruption."""
        return self.recorder.inflight

    @property
    def outcomes(self) -> dict[Verdict, int]:
        """Requests by outcome."""
        return {outcome: self.recorder.outcomes[outcome] for outcome in Verdict}

    @property
    def other_statuses(self) -> dict[int, int]:
        """The statuses counted as "other", with their counts, most frequent first."""
        return dict(self.recorder.statuses.most_common())

    @property
    def ok(self) -> Histogram:
        """Latencies of 2xx answers."""
        return self.recorder.ok

    @property
    def rejected(self) -> Histogram:
        """Latencies of 429 and 503 answers."""
        return self.recorder.rejected

    @property
    def lag(self) -> Histogram:
        """How late the generator was: its sends (open model) or its loop (closed)."""
        return self.recorder.lag

    # -- rates --------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        """Seconds from the start to the last outcome (or the last send)."""
        return max(self.recorder.elapsed, self.recorder.send_span)

    @property
    def window(self) -> float:
        """Seconds the sending took: as planned, or longer when the generator fell behind."""
        if self.spec.model is Model.CLOSED:
            return self.elapsed
        if self.interrupted:
            # n sends on schedule span (n - 1) gaps: count the last one's gap too
            assert self.spec.rate is not None
            return self.recorder.send_span + 1 / self.spec.rate
        return max(self.planned_span, self.recorder.send_span)

    @property
    def achieved_rate(self) -> float:
        """Requests sent per second of :attr:`window` (0 before any)."""
        return self.sent / self.window if self.window > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Outcomes per second, from the start to the last one."""
        return self.recorder.answered / self.elapsed if self.elapsed > 0 else 0.0

    # -- validity -----------------------------------------------------------------------

    @property
    def problems(self) -> list[str]:
        """Why the run cannot be trusted; empty when it can."""
        found = []
        late = self.lag.percentile(99)
        if late > LAG_LIMIT:
            what = "its sends left" if self.spec.model is Model.OPEN else "its event loop woke"
            found.append(
                f"{what} {late * 1e3:,.1f} ms late at p99 "
                f"(more than {LAG_LIMIT * 1e3:g} ms: give it more --processes, or less work)"
            )
        if self.spec.model is Model.OPEN and not self.interrupted and self.planned_span > 0:
            asked = self.recorder.scheduled / self.planned_span
            issued = (self.sent + self.dropped) / self.window if self.window > 0 else 0.0
            if issued < RATE_FLOOR * asked:
                missed = f", {self.recorder.missed:,} never sent" if self.recorder.missed else ""
                found.append(
                    f"it issued {issued:,.1f} requests/s of the {asked:,.1f}/s scheduled "
                    f"(less than {RATE_FLOOR:.0%}{missed})"
                )
        return found

    @property
    def valid(self) -> bool:
        """Whether the generator kept up, so that the latencies are the server's."""
        return not self.problems

    # -- timeline -----------------------------------------------------------------------

    def timeline(self) -> list[Second]:
        """Return the timeline, bucket by bucket, up to the last one with any request."""
        rows = self.recorder.timeline
        last = max((i for i, row in enumerate(rows) if any(row)), default=-1)
        width = self.recorder.width
        seconds = []
        for index, row in enumerate(rows[: last + 1]):
            counts = {"sent": row[Column.SENT], "dropped": row[Column.DROPPED]}
            counts.update({outcome.key: row[outcome] for outcome in Verdict})
            seconds.append(
                Second(index * width, width, counts, self.recorder.timeline_ok.get(index))
            )
        return seconds

    # -- JSON ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Return everything measured as plain JSON values; latencies in milliseconds.

        The 2xx and rejection histograms are included whole (HdrHistogram's base64 V2
        form), so that runs can be merged later without losing anything.
        """
        spec = self.spec
        return {
            "url": spec.url,
            "method": spec.method,
            "model": spec.model.value,
            "arrivals": spec.arrivals.value if spec.model is Model.OPEN else None,
            "target_rate": spec.rate,
            "users": spec.users,
            "duration_s": spec.duration,
            "processes": self.processes,
            "interrupted": self.interrupted,
            "valid": self.valid,
            "problems": self.problems,
            "elapsed_s": round(self.elapsed, 6),
            "achieved_rate": round(self.achieved_rate, 3),
            "throughput": round(self.throughput, 3),
            "requests": {
                "scheduled": self.recorder.scheduled if spec.model is Model.OPEN else None,
                "sent": self.sent,
                "dropped": self.dropped,
                "missed": self.recorder.missed,
                "unfinished": self.unfinished,
                "max_inflight": spec.max_inflight if spec.model is Model.OPEN else None,
            },
            "outcomes": {outcome.key: count for outcome, count in self.outcomes.items()},
            "other_statuses": {str(s): n for s, n in self.other_statuses.items()},
            "errors": dict(self.recorder.errors),
            "latency_ms": {
                "from": "intended send" if spec.model is Model.OPEN else "actual send",
                "2xx": _summary(self.ok),
                "rejections": _summary(self.rejected),
            },
            "generator_lag_ms": _summary(self.lag),
            "timeline": [
                {
                    "start_s": second.start,
                    **second.counts,
                    **{f"{k}_ms": _ms(v) for k, v in second.latency().items()},
                }
                for second in self.timeline()
            ],
            "histograms": {
                "unit": "microseconds",
                "2xx": self.ok.encode().decode("ascii"),
                "rejections": self.rejected.encode().decode("ascii"),
            },
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _summary(histogram: Histogram) -> dict[str, float | int]:
    out: dict[str, float | int] = {"count": histogram.count, "mean": _ms(histogram.mean)}
    out.update({name: _ms(value) for name, value in histogram.summary().items()})
    return out
