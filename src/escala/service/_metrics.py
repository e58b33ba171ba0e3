"""What the service measures: Prometheus metrics, recent windows for the dashboard, and
the event-loop lag probe.

Prometheus histograms answer "over all time, per scrape interval"; the dashboard wants
"the last few seconds", so the same observations also go into short rings from which
exact percentiles are taken.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LoopLagProbe", "Metrics", "percentiles"]

# from 100 µs to 30 s: loop lag lives at the bottom, job latencies anywhere
_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def percentiles(
    values: Iterable[float], points: Iterable[float] = (50, 90, 99)
) -> dict[str, float]:
    """Return the nearest-rank percentiles of ``values`` in milliseconds (0 when empty)."""
    ordered = sorted(values)
    out: dict[str, float] = {}
    for p in points:
        if not ordered:
            out[f"p{p:g}"] = 0.0
            continue
        rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)
        out[f"p{p:g}"] = round(ordered[rank] * 1000, 3)
    out["max"] = round(ordered[-1] * 1000, 3) if ordered else 0.0
    return out


class Metrics:
    """One registry per service, so that several services in one process never clash."""

    def __init__(self, window: int = 2048) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("escala_jobs_submitted", "Jobs accepted.", ["pool"], registry=r)
        self.finished = Counter(
            "escala_jobs_finished", "Jobs that ended, by state.", ["pool", "state"], registry=r
        )
        self.rejected = Counter(
            "escala_requests_rejected",
            "Requests refused by admission control, by reason.",
            ["reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "escala_job_queue_seconds", "Time jobs waited.", ["pool"], buckets=_BUCKETS, registry=r
        )
        self.run_time = Histogram(
            "escala_job_run_seconds", "Time jobs ran.", ["pool"], buckets=_BUCKETS, registry=r
        )
        self.loop_lag = Histogram(
            "escala_loop_lag_seconds",
            "How late the event loop woke a timer: time it was blocked.",
            buckets=_BUCKETS,
            registry=r,
        )
        self.queued = Gauge("escala_jobs_queued", "Jobs waiting.", ["pool"], registry=r)
        self.running = Gauge("escala_jobs_running", "Jobs running.", ["pool"], registry=r)
        self.workers = Gauge("escala_workers", "Workers of each pool.", ["pool"], registry=r)
        self.inflight = Gauge("escala_http_inflight", "HTTP requests being handled.", registry=r)
        self.connections = Gauge("escala_http_connections", "HTTP connections open.", registry=r)
        self.shed = Counter(
            "escala_http_connections_shed",
            "Connections closed or refused to keep the server reachable, by reason: "
            "evicted (idle, to make room), refused (at the cap), header_timeout.",
            ["reason"],
            registry=r,
        )
        self.started = time.time()
        self.recent_wait: deque[float] = deque(maxlen=window)
        self.recent_run: deque[float] = deque(maxlen=window)
        self.recent_total: deque[float] = deque(maxlen=window)
        self.recent_lag: deque[float] = deque(maxlen=window)
        self.recent_done: deque[float] = deque(maxlen=window * 8)  # monotonic finish times

    def job_done(self, pool: str, state: str, waited: float, ran: float) -> None:
        """Count a finished job and its latencies."""
        self.finished.labels(pool, state).inc()
        self.queue_wait.labels(pool).observe(waited)
        self.run_time.labels(pool).observe(ran)
        self.recent_wait.append(waited)
        self.recent_run.append(ran)
        self.recent_total.append(waited + ran)
        self.recent_done.append(time.monotonic())

    @staticmethod
    def totals(counter: Counter, label: str) -> dict[str, int]:
        """Return a counter's totals by one of its labels, summed over the others."""
        found: dict[str, int] = {}
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels[label]
                    found[key] = found.get(key, 0) + int(sample.value)
        return found

    def figures(self) -> dict[str, Any]:
        """Return the counts, rates and recent percentiles the dashboard shows."""
        finished = self.totals(self.finished, "state")
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "jobs": {
                "submitted": sum(self.totals(self.submitted, "pool").values()),
                **{state: finished.get(state, 0) for state in ("succeeded", "failed", "cancelled")},
            },
            "rejected": self.totals(self.rejected, "reason"),
            "connections_shed": self.totals(self.shed, "reason"),
            "throughput_per_s": self.throughput(),
            "latency_ms": {
                "queue": percentiles(self.recent_wait),
                "run": percentiles(self.recent_run),
                "total": percentiles(self.recent_total),
            },
            "loop_lag_ms": percentiles(list(self.recent_lag)[-250:]),
        }

    def throughput(self, span: float = 5.0) -> float:
        """Return jobs finished per second over the last ``span`` seconds."""
        since = time.monotonic() - span
        done = sum(1 for t in reversed(self.recent_done) if t >= since)
        return round(done / span, 2)


class LoopLagProbe:
    """Measure how late the event loop runs a timer, continuously.

    A callback that asked to run ``interval`` seconds from now and ran later was kept
    waiting by whatever held the loop: that delay is exactly what every request on this
    loop suffers, so it is the one number that says whether the loop is ever blocked.
    """

    def __init__(self, metrics: Metrics, interval: float = 0.02) -> None:
        self._metrics = metrics
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="escala-loop-lag")

    async def stop(self) -> None:
        """Stop probing."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            lag = max(0.0, loop.time() - planned)
            self._metrics.loop_lag.observe(lag)
            self._metrics.recent_lag.append(lag)
