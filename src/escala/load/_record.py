"""What one generator process saw: outcome counts, latency histograms, a timeline.

A :class:`Recorder` lives in one process and one event loop, so it needs no lock. It
pickles with its histograms encoded, travels back to the parent as the result of an escala
task, and the parent adds the recorders of all processes into one with :meth:`add`:
counts add, histograms add losslessly, spans take the longest.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from typing import Any

from ._histogram import Histogram

__all__ = ["Column", "Recorder", "Verdict", "bucket_width"]

# A per-second timeline for runs up to ten minutes; longer runs get wider buckets, so
# that the timeline never holds more than 600 of them (each may hold a histogram).
_MAX_BUCKETS = 600


class Verdict(enum.IntEnum):
    """What became of a request that was sent."""

    OK = 0  # a 2xx answer
    TOO_MANY = 1  # 429: the server refused this client's excess (rate limit)
    UNAVAILABLE = 2  # 503: the server refused for its own overload
    OTHER = 3  # any other status: 4xx, 5xx, 3xx
    TIMEOUT = 4  # no complete answer within the request timeout
    CONNECTION = 5  # refused, reset or broken: no HTTP answer at all

    @property
    def label(self) -> str:
        """The name in reports: ``2xx``, ``429``, ``timeouts``…"""
        return _LABELS[self]

    @property
    def key(self) -> str:
        """The name in JSON: ``2xx``, ``429``, ``timeout``, ``connection_error``…"""
        return _KEYS[self]

    @classmethod
    def of_status(cls, status: int) -> Verdict:
        """Return the class of an HTTP status."""
        if 200 <= status < 300:
            return cls.OK
        if status == 429:
            return cls.TOO_MANY
        if status == 503:
            return cls.UNAVAILABLE
        return cls.OTHER


_LABELS = {
    Verdict.OK: "2xx",
    Verdict.TOO_MANY: "429",
    Verdict.UNAVAILABLE: "503",
    Verdict.OTHER: "other",
    Verdict.TIMEOUT: "timeouts",
    Verdict.CONNECTION: "connection errors",
}
_KEYS = {
    **_LABELS,
    Verdict.TIMEOUT: "timeout",
    Verdict.CONNECTION: "connection_error",
}
_REJECTIONS = (Verdict.TOO_MANY, Verdict.UNAVAILABLE)


class Column(enum.IntEnum):
    """The counts kept per timeline bucket: one per outcome, then these."""

    DROPPED = len(Verdict)  # due while every in-flight slot was taken: never sent
    SENT = len(Verdict) + 1


def bucket_width(duration: float) -> float:
    """Return the timeline's bucket width in seconds for a run of ``duration``."""
    return float(max(1, math.ceil(duration / _MAX_BUCKETS)))


class Recorder:
    """Counts and latencies of the requests of one process (or, after :meth:`add`, many).

    Times given to it are seconds since the run's start (``t0``), the same instant in
    every process; a request is filed in the timeline bucket of its intended send time
    (open model) or its send time (closed model).

    Args:
        duration: the run's planned duration, which sizes the timeline.
    """

    def __init__(self, duration: float) -> None:
        self.width = bucket_width(duration)
        self.timeline = [[0] * len(_COLUMNS) for _ in range(math.ceil(duration / self.width))]
        self.timeline_ok: dict[int, Histogram] = {}
        self.outcomes = [0] * len(Verdict)
        self.statuses: Counter[int] = Counter()  # the statuses counted as "other"
        self.ok = Histogram()
        self.rejected = Histogram()
        self.lag = Histogram()  # how late the generator was: a measure of itself
        self.errors: dict[str, str] = {}  # one example message per outcome with no answer
        self.sent = 0
        self.dropped = 0
        self.scheduled = 0  # open model: intended sends the schedule held
        self.missed = 0  # of those, never issued: the generator was too far behind
        self.inflight = 0
        self.send_span = 0.0  # t0 to the last send (or drop)
        self.elapsed = 0.0  # t0 to the last answer

    # -- recording (one event loop, no lock) ------------------------------------------

    def on_send(self, at: float, now: float) -> None:
        """Count a request sent ``now``, filed under ``at``."""
        self.sent += 1
        self.inflight += 1
        self.timeline[self._bucket(at)][Column.SENT] += 1
        self.send_span = max(self.send_span, now)

    def on_drop(self, at: float, now: float) -> None:
        """Count a request due at ``at`` and not sent: the in-flight cap was reached."""
        self.dropped += 1
        self.timeline[self._bucket(at)][Column.DROPPED] += 1
        self.send_span = max(self.send_span, now)

    def on_answer(
        self,
        at: float,
        now: float,
        outcome: Verdict,
        latency: float,
        status: int = 0,
        error: str = "",
    ) -> None:
        """Count the outcome of a request filed under ``at``, answered ``now``."""
        self.inflight -= 1
        self.outcomes[outcome] += 1
        bucket = self._bucket(at)
        self.timeline[bucket][outcome] += 1
        self.elapsed = max(self.elapsed, now)
        if outcome is Verdict.OK:
            self.ok.record(latency)
            per_bucket = self.timeline_ok.get(bucket)
            if per_bucket is None:
                per_bucket = self.timeline_ok[bucket] = Histogram(digits=2)
            per_bucket.record(latency)
        elif outcome in _REJECTIONS:
            self.rejected.record(latency)
        elif outcome is Verdict.OTHER:
            self.statuses[status] += 1
        if error and outcome.key not in self.errors:
            self.errors[outcome.key] = error

    def _bucket(self, at: float) -> int:
        return min(max(int(at // self.width), 0), len(self.timeline) - 1)

    # -- merging ------------------------------------------------------------------------

    def add(self, other: Recorder) -> None:
        """Add everything ``other`` recorded into this recorder."""
        if other.width != self.width or len(other.timeline) != len(self.timeline):
            raise ValueError("recorders of runs of different durations do not add up")
        for row, more in zip(self.timeline, other.timeline, strict=True):
            for column, count in enumerate(more):
                row[column] += count
        for bucket, histogram in other.timeline_ok.items():
            if bucket in self.timeline_ok:
                self.timeline_ok[bucket].add(histogram)
            else:
                self.timeline_ok[bucket] = Histogram.merged([histogram], digits=2)
        self.outcomes = [a + b for a, b in zip(self.outcomes, other.outcomes, strict=True)]
        self.statuses.update(other.statuses)
        self.ok.add(other.ok)
        self.rejected.add(other.rejected)
        self.lag.add(other.lag)
        for key, message in other.errors.items():
            self.errors.setdefault(key, message)
        self.sent += other.sent
        self.dropped += other.dropped
        self.scheduled += other.scheduled
        self.missed += other.missed
        self.inflight += other.inflight
        self.send_span = max(self.send_span, other.send_span)
        self.elapsed = max(self.elapsed, other.elapsed)

    @property
    def answered(self) -> int:
        """Requests with an outcome (an answer, a timeout or a connection error)."""
        return sum(self.outcomes)

    # Histograms travel encoded: the HdrHistogram objects themselves do not pickle.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("ok", "rejected", "lag"):
            state[name] = state[name].encode()
        state["timeline_ok"] = {b: h.encode() for b, h in self.timeline_ok.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in ("ok", "rejected", "lag"):
            state[name] = Histogram.decode(state[name])
        state["timeline_ok"] = {b: Histogram.decode(h) for b, h in state["timeline_ok"].items()}
        self.__dict__.update(state)


_COLUMNS = (*Verdict, *Column)
