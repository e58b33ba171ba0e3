"""Adaptive concurrency (AIMD-style) and the advisor's decision rules, on their own."""

from __future__ import annotations

import threading
import time

import pytest

from escala._adaptive import ConcurrencyLimit
from escala._drive import drive
from escala._engine import BatchSizer, Scheduler
from escala._options import Retry
from escala.advisor import Measurements, Reason
from escala.advisor._decide import THREADS_CAP, decide
from escala.backends.base import Call
from escala.backends.threads import ThreadBackend


def feed(
    limit: ConcurrencyLimit,
    latency: float,
    *,
    failed: int = 0,
    seconds: float = 0.1,
    start: float = 0.0,
) -> float:
    """Report one interval's worth of completions at a given latency; return the new time."""
    now = start + seconds
    limit.record(20, failed, latency, now)
    return now


def test_the_limit_grows_while_waiting_is_free() -> None:
    limit = ConcurrencyLimit(4, high=100)
    now = 0.0
    limit.record(0, 0, 0.0, now)  # the measuring window opens
    for _ in range(6):
        now = feed(limit, 0.01, start=now)
    assert limit.value > 4 * 2
    assert [v for _, v in limit.history] == sorted(v for _, v in limit.history)


def test_the_limit_falls_when_tasks_queue_somewhere() -> None:
    limit = ConcurrencyLimit(40, high=100)
    limit.record(0, 0, 0.0, 0.0)
    now = feed(limit, 0.01, start=0.0)  # the latency with nothing queued: 10 ms
    before = limit.value
    now = feed(limit, 0.04, start=now)  # four times slower: something saturated
    assert limit.value <= before // 2


def test_failures_halve_the_limit() -> None:
    limit = ConcurrencyLimit(32, high=100)
    limit.record(0, 0, 0.0, 0.0)
    now = feed(limit, 0.01, start=0.0)
    before = limit.value
    feed(limit, 0.01, failed=3, start=now)
    assert limit.value == before // 2


def test_a_rise_that_lowers_throughput_is_taken_back() -> None:
    limit = ConcurrencyLimit(8, high=100)
    limit.record(0, 0, 0.0, 0.0)
    limit.record(20, 0, 0.01, 0.1)  # 200 tasks/s at 8
    raised = limit.value
    assert raised > 8
    limit.record(10, 0, 0.01, 0.2)  # 100 tasks/s after the rise
    assert limit.value == 8


def test_the_limit_stays_within_its_bounds() -> None:
    limit = ConcurrencyLimit(500, low=2, high=50)
    assert limit.value == 50
    now = 0.0
    limit.record(0, 0, 0.0, now)
    for _ in range(20):
        now = feed(limit, 0.01, failed=5, start=now)
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
