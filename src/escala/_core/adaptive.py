"""Adaptive concurrency for work that waits: find how many tasks at once pay, while running.

The advisor's first guess (cores × (1 + wait/compute)) assumes that what a task waits on
does not slow down when more tasks wait on it at once. A real server, disk or database
does, past some point; and sometimes it serves many at once better than the guess says.
This controller climbs towards the concurrency that gives the most throughput, the way
TCP's congestion control probes for bandwidth, with Netflix concurrency-limits' latency
gradient as a brake. Each interval it compares throughput with the interval before:

- after a rise: throughput rose clearly (over 5 %), so keep rising (by half, like TCP's
  slow start); else the extra tasks bought nothing, only queueing somewhere: step back,
  and hold a few intervals before probing again;
- after a fall: throughput fell, so go back up; else hold;
- with no change to judge: latency far above the lowest seen means tasks are queueing
  (scale down by that ratio); otherwise probe with a rise;
- failures well above the lowest share seen halve the limit (the service may be shedding
  load); a steady share of failures is the tasks' own, and no reason to slow down.

No I/O, no clock of its own: the scheduler feeds it completions and the time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["ASYNC_CAP", "ASYNC_START", "ConcurrencyLimit", "for_coroutines"]

#: A change of throughput smaller than this is noise.
NOISE = 0.05
#: Latency this many times the lowest seen means tasks queue somewhere.
QUEUEING = 3.0
#: A share of failed tasks this much above the lowest seen means the service sheds load.
SHEDDING = 0.1
#: Where coroutines start when escala chooses how many await at once: one that waits
#: costs a few kilobytes, so hundreds at once are cheap, and the latency brake brings the
#: limit down where what they wait on slows with the crowd...
ASYNC_START = 512
#: ...and the most it may climb to.
ASYNC_CAP = 8192


@dataclass
class ConcurrencyLimit:
    """How many tasks may be in flight now, adjusted from throughput, latency and errors.

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
    interval: float = 0.05
    min_samples: int = 8
    history: list[tuple[float, int]] = field(default_factory=list)  # (time, new limit)
    _start: float | None = None
    _done: int = 0
    _failed: int = 0
    _latencies: list[float] = field(default_factory=list)
    _base_latency: float | None = None
    _base_failures: float | None = None  # the lowest share of failures in an interval
    _last_rate: float | None = None
    _last_latency: float | None = None
    _previous: int | None = None  # the limit before the last change
    _cooldown: int = 0  # intervals to hold after a rise that did not pay

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
            # the lowest latency seen is the one with nothing queued
            self._base_latency = min(self._base_latency or latency, latency)
        elapsed = now - self._start
        if elapsed < self.interval or self._done < self.min_samples:
            return
        self._adjust(self._done / elapsed, now)

    def _adjust(self, rate: float, now: float) -> None:
        old = self.value
        latency = statistics.median(self._latencies) if self._latencies else None
        failures = self._failed / self._done if self._done else 0.0
        base = self._base_failures
        self._base_failures = failures if base is None else min(base, failures)
        if failures > (base or 0.0) + SHEDDING:
            new = old // 2
        else:
            new = self._climb(old, rate, latency)
        self.value = max(self.low, min(self.high, new))
        self._previous = old if self.value != old else None
        if self.value != old:
            self.history.append((now, self.value))
        self._last_rate, self._last_latency = rate, latency
        self._start, self._done, self._failed = now, 0, 0
        self._latencies.clear()

    def _climb(self, old: int, rate: float, latency: float | None) -> int:
        previous, last_rate = self._previous, self._last_rate
        if previous is not None and last_rate is not None:
            gain = rate / last_rate if last_rate > 0 else 1.0
            if old > previous:  # we rose last time
                if gain > 1 + NOISE:
                    return old + max(2, old // 2)
                self._cooldown = 4  # it bought nothing: back, and rest before probing again
                return previous
            # we fell last time
            return previous if gain < 1 - NOISE else old
        if self._cooldown:
            self._cooldown -= 1
            return old
        queueing = (
            latency is not None
            and self._base_latency is not None
            and latency > QUEUEING * self._base_latency
        )
        if queueing and latency is not None and self._base_latency is not None:
            return int(old * max(0.5, self._base_latency / latency))
        return old + max(2, old // 2)


def for_coroutines(total: int | None) -> ConcurrencyLimit:
    """The adaptive limit for coroutines when the caller did not fix one."""
    high = min(ASYNC_CAP, total) if total else ASYNC_CAP
    return ConcurrencyLimit(min(ASYNC_START, high), high=max(1, high))
