"""Adaptive concurrency for work that waits: find how many tasks at once pay, while running.

The advisor's first guess (cores × (1 + wait/compute)) assumes that what a task waits on
does not slow down when more tasks wait on it at once. A real server, disk or database
does, past some point. This controller keeps adjusting the limit from what the run shows,
the way TCP congestion control and Netflix's concurrency-limits do:

- each interval, it compares the tasks' latency now with the lowest seen (the latency with
  nothing queued): while they match, waiting is free, so it raises the limit (by half, as
  TCP's slow start grows until the first sign of congestion); when latency grows, tasks
  are queueing somewhere, so it scales the limit down by that ratio;
- when throughput falls although the limit rose, it backs off;
- when tasks fail, it halves the limit (the service may be shedding load).

No I/O, no clock of its own: the scheduler feeds it completions and the time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["ConcurrencyLimit"]


@dataclass
class ConcurrencyLimit:
    """How many tasks may be in flight now, adjusted from latency, throughput and errors.

    Args:
        value: the starting limit.
        low: never below this.
        high: never above this (the threads available).
        interval: seconds between adjustments.
        min_samples: completions needed before an adjustment.
    """

    value: int
    low: int = 1
    high: int = 256
    interval: float = 0.1
    min_samples: int = 8
    history: list[tuple[float, int]] = field(default_factory=list)  # (time, new limit)
    _start: float | None = None
    _done: int = 0
    _failed: int = 0
    _latencies: list[float] = field(default_factory=list)
    _base_latency: float | None = None
    _last_rate: float | None = None
    _last_value: int | None = None

    def __post_init__(self) -> None:
        self.value = max(self.low, min(self.high, self.value))

    def record(self, tasks: int, failed: int, latency: float, now: float) -> None:
        """Take in ``tasks`` completions (``failed`` of them failures) at time ``now``.

        Args:
            tasks: tasks completed.
            failed: how many of them failed.
            latency: seconds each took (the batch's busy time per task).
            now: the current time, monotonic seconds.
        """
        if self._start is None:
            self._start = now
        self._done += tasks
        self._failed += failed
        if latency > 0:
            self._latencies.extend([latency] * min(tasks, 8))
        elapsed = now - self._start
        if elapsed < self.interval or self._done < self.min_samples:
            return
        self._adjust(elapsed, now)

    def _adjust(self, elapsed: float, now: float) -> None:
        rate = self._done / elapsed
        old = self.value
        if self._failed:
            new = old // 2
        elif self._latencies:
            latency = statistics.median(self._latencies)
            base = self._base_latency = (
                latency if self._base_latency is None else min(self._base_latency, latency)
            )
            gradient = base / latency if latency > 0 else 1.0
            fell = (
                self._last_rate is not None
                and self._last_value is not None
                and old > self._last_value
                and rate < 0.9 * self._last_rate
            )
            if fell:
                new = self._last_value or old
            elif gradient >= 0.9:
                new = old + max(2, old // 2)
            else:
                new = int(old * max(gradient, 0.5))
        else:
            new = old
        self.value = max(self.low, min(self.high, new))
        if self.value != old:
            self.history.append((now, self.value))
        self._last_rate, self._last_value = rate, old
        self._start, self._done, self._failed = now, 0, 0
        self._latencies.clear()
