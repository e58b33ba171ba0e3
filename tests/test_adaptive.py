"""Adaptive concurrency (AIMD-style) and the advisor's decision rules, on their own."""

from __future__ import annotations

import threading
import time

import pytest

from escala._core.adaptive import ConcurrencyLimit
from escala._core.drive import drive
from escala._core.scheduler import BatchSizer, Scheduler
from escala._options import Retry
from escala._worker.messages import Call
from escala.advisor import Measurements, Reason
from escala.advisor._decide import THREADS_CAP, decide
from escala.backends.threads import ThreadBackend


class Service:
    """A simulated service: what throughput and latency a given concurrency gets.

    ``capacity`` requests are served at once, ``base`` seconds each; more only queue.
    ``slowdown`` makes each extra request slow all the others a little (a disk).
    ``collapse`` past this many at once, throughput falls (thrashing).
    """

    def __init__(
        self,
        base: float = 0.01,
        capacity: float = float("inf"),
        slowdown: float = 0.0,
        collapse: int | None = None,
    ) -> None:
        self.base, self.capacity, self.slowdown, self.collapse = base, capacity, slowdown, collapse

    def latency(self, n: int) -> float:
        queued = max(1.0, n / self.capacity)
        return self.base * queued * (1 + self.slowdown * n)

    def rate(self, n: int) -> float:
        rate = n / self.latency(n)
        if self.collapse is not None and n > self.collapse:
            rate *= (self.collapse / n) ** 2  # past it, more at once get less done
        return rate


def run(limit: ConcurrencyLimit, service: Service, intervals: int, failing: float = 0.0) -> None:
    """Let the controller steer ``service`` for some intervals of 0.1 s, with ``failing``
    the share of tasks that fail."""
    now = 0.0
    limit.record(0, 0, 0.0, now)  # the measuring window opens
    limit.record(8, 0, service.base, 0.01)  # the first tasks met no queue
    now = 0.01
    for _ in range(intervals):
        now += 0.1
        tasks = max(limit.min_samples, round(service.rate(limit.value) * 0.1))
        limit.record(tasks, round(failing * tasks), service.latency(limit.value), now)


def test_the_limit_grows_while_throughput_grows() -> None:
    limit = ConcurrencyLimit(4, high=200)
    run(limit, Service(), intervals=12)  # nothing saturates: more in flight, more done
    assert limit.value >= 50


def test_the_limit_keeps_growing_when_latency_and_throughput_both_grow() -> None:
    """A disk: each extra writer slows the others, but the total still rises."""
    limit = ConcurrencyLimit(6, high=200)
    service = Service(slowdown=0.01)
    run(limit, service, intervals=16)
    assert limit.value > 12
    assert service.rate(limit.value) > service.rate(6)


def test_the_limit_falls_to_what_a_saturated_service_serves() -> None:
    """Four at once, more only queue: starting at 64, come down near 4."""
    limit = ConcurrencyLimit(64, high=64)
    run(limit, Service(capacity=4), intervals=20)
    assert limit.value <= 12


def test_a_rise_that_lowers_throughput_is_taken_back() -> None:
    limit = ConcurrencyLimit(8, high=100)
    run(limit, Service(collapse=8), intervals=10)  # past 8 at once, it thrashes
    assert limit.value <= 12


def test_failures_halve_the_limit() -> None:
    limit = ConcurrencyLimit(32, high=100)
    limit.record(0, 0, 0.0, 0.0)
    limit.record(20, 3, 0.01, 0.1)
    assert limit.value == 16


def test_a_steady_share_of_failures_does_not_bring_the_limit_down() -> None:
    """5 % of the tasks fail whatever the concurrency: their own failures, not shedding."""
    limit = ConcurrencyLimit(8, high=200)
    run(limit, Service(), intervals=12, failing=0.05)
    assert limit.value >= 50


def test_failures_that_rise_above_the_usual_share_halve_the_limit() -> None:
    limit = ConcurrencyLimit(40, high=100)
    limit.record(0, 0, 0.0, 0.0)
    limit.record(100, 5, 0.01, 0.1)  # 5 %: the usual share
    before = limit.value
    limit.record(100, 30, 0.01, 0.2)  # 30 %: shedding
    assert limit.value == before // 2


def test_a_plateau_does_not_make_the_limit_drift_up() -> None:
    limit = ConcurrencyLimit(8, high=200)
    flat = Service(capacity=8)  # 8 at once is all it serves; latency alone grows past it
    run(limit, flat, intervals=30)
    assert limit.value <= 12


def test_the_limit_stays_within_its_bounds() -> None:
    limit = ConcurrencyLimit(500, low=2, high=50)
    assert limit.value == 50
    limit.record(0, 0, 0.0, 0.0)
    for step in range(1, 8):  # ever more failures: halved each time, down to the floor
        limit.record(100, 10 + 12 * step, 0.01, 0.1 * step)
    assert limit.value == 2


def test_the_scheduler_window_is_the_limit() -> None:
    limit = ConcurrencyLimit(3, high=10)
    sched = Scheduler(
        Call(str),
        workers=10,
        sizer=BatchSizer(None, adaptive=False, workers=10, total=None),
        ordered=False,
        collect=False,
        retry=Retry(),
        limit=limit,
    )
    assert sched.window == 3
    limit.value = 7
    assert sched.room() == 7


def test_threads_settle_near_what_a_saturated_service_sustains() -> None:
    """A 'service' that serves 4 requests at once, 10 ms each: more in flight only queue.
    Starting far too high (64), the limit must come down near 4 without losing a task."""
    capacity = threading.Semaphore(4)

    def request(x: int) -> int:
        with capacity:
            time.sleep(0.01)
        return x

    limit = ConcurrencyLimit(64, high=64)
    backend = ThreadBackend(64)
    sched = Scheduler(
        Call(request),
        workers=64,
        sizer=BatchSizer(None, adaptive=False, workers=64, total=None),
        ordered=False,
        collect=False,
        retry=Retry(),
        limit=limit,
    )
    backend.start()
    results = sorted(
        v for _, values in drive(backend, sched, range(800), owned=True) for v in values
    )
    assert results == list(range(800))
    assert limit.history, "the limit never moved"
    assert limit.value <= 24


# -- the decision rules ------------------------------------------------------------------


def measured(**given: object) -> Measurements:
    figures: dict[str, object] = {
        "samples": 8,
        "lower_bound": False,
        "wall": 0.01,
        "cpu": 0.01,
        "queued": 0.0,
        "gil_held": True,
        "gil_wait": 0.005,
        "free_threaded": False,
        "arg_bytes": 30,
        "result_bytes": 30,
        "picklable": True,
        "total": 1000,
        "cores": 4,
        "overhead": {"threads-task": 2e-5, "processes-start": 0.01, "processes-task": 3e-7},
    }
    figures.update(given)
    return Measurements(**figures)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "remaining", "mode", "reason"),
    [
        ({"cpu": 0.0005, "gil_held": False}, 1000, "threads", Reason.WAITS),
        ({"gil_held": False}, 1000, "threads", Reason.RELEASES_GIL),
        ({"free_threaded": True, "gil_held": None}, 1000, "threads", Reason.RELEASES_GIL),
        ({}, 1000, "processes", Reason.HOLDS_GIL),
        ({"gil_held": None}, 1000, "processes", Reason.HOLDS_GIL),
        ({"cores": 1}, 1000, "sequential", Reason.ONE_CORE),
        ({"picklable": False}, 1000, "sequential", Reason.NOT_PICKLABLE),
        ({"wall": 5e-8, "cpu": 5e-8}, 100_000, "sequential", Reason.TOO_SMALL),
        ({}, 1, "sequential", Reason.TOO_SMALL),
        ({}, 0, "sequential", Reason.ALL_SAMPLED),
    ],
    ids=[
        "waits",
        "releases-gil",
        "free-threaded",
        "holds-gil",
        "gil-unknown",
        "one-core",
        "not-picklable",
        "too-short",
        "too-few",
        "all-sampled",
    ],
)
def test_decision_rules(
    given: dict[str, object], remaining: int, mode: str, reason: Reason
) -> None:
    advice = decide(measured(**given), remaining)
    assert (advice.mode, advice.reason) == (mode, reason)


def test_waiting_work_gets_cores_times_one_plus_wait_over_compute() -> None:
    advice = decide(measured(wall=0.0105, cpu=0.0005, gil_held=False, cores=2), 1000)
    assert advice.workers == 2 * (1 + 20)
    text = advice.explain()
    assert "CPU time was 5% of wall time" in text
    assert "2 cores × (1 + 20.0) ≈ 42" in text
    capped = decide(measured(wall=0.0201, cpu=0.0001, gil_held=False, cores=2), 1000)
    assert capped.workers == THREADS_CAP
    assert f"capped at {THREADS_CAP}" in capped.explain()


def test_processes_batch_small_tasks_to_about_20_ms() -> None:
    advice = decide(measured(wall=0.0001, cpu=0.0001), 1_000_000)
    assert advice.mode == "processes"
    assert advice.batch == 200
    assert "200 task(s) per hand-off" in advice.explain()
