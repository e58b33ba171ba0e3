"""Pool: workers kept across calls, futures from submit, map/imap on the same workers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pathlib
import threading
import time
from typing import Any

import pytest

import escala


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


async def aadd(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def test_submit_returns_a_future(mode: str) -> None:
    with escala.Pool(mode, workers=2) as pool:
        future = pool.submit(add, 1, 2, scale=10)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=30) == 30
        assert pool.submit(aadd, 4, 5).result(timeout=30) == 9


def test_submit_failure_is_the_futures_exception(mode: str) -> None:
    with escala.Pool(mode, workers=2) as pool:
        future = pool.submit(int, "not a number")
        with pytest.raises(ValueError, match="invalid literal"):
            future.result(timeout=30)


def test_map_and_imap_reuse_the_same_workers() -> None:
    with escala.Pool("processes", workers=2) as pool:
        seen = set(pool.map(_pid, range(50)))
        seen |= set(pool.imap(_pid, range(50)))
        seen |= {pool.submit(_pid, 0).result(timeout=30) for _ in range(10)}
        assert 1 <= len(seen) <= 2  # the same two workers served every call
        assert os.getpid() not in seen


def _pid(_: int) -> int:
    return os.getpid()


def test_many_threads_may_share_one_pool(mode: str) -> None:
    results: dict[int, list[int]] = {}
    with escala.Pool(mode, workers=2) as pool:

        def run(k: int) -> None:
            results[k] = pool.map(abs, range(-k, 0))

        callers = [threading.Thread(target=run, args=(k,)) for k in range(1, 5)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
    assert results == {k: list(range(k, 0, -1)) for k in range(1, 5)}


def test_close_waits_for_submitted_work(mode: str, tmp_path: pathlib.Path) -> None:
    def slow(x: int) -> int:
        time.sleep(0.05)
        (tmp_path / str(x)).touch()
        return x

    pool = escala.Pool(mode, workers=2)
    futures = [pool.submit(slow, i) for i in range(4)]
    pool.close()
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]
    assert len(list(tmp_path.iterdir())) == 4


def test_leaving_with_an_error_cancels_queued_work(tmp_path: pathlib.Path) -> None:
    def slow(x: int) -> int:
        time.sleep(0.2)
        return x

    futures: list[concurrent.futures.Future[int]] = []

    def submit_then_fail() -> None:
        with escala.Pool("processes", workers=1) as pool:
            futures.extend(pool.submit(slow, i) for i in range(20))
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        submit_then_fail()
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures) >= 15


def test_a_closed_pool_refuses_work(mode: str) -> None:
    pool = escala.Pool(mode)
    pool.close()
    with pytest.raises(escala.PoolClosed):
        pool.submit(abs, 1)
    with pytest.raises(escala.PoolClosed):
        pool.map(abs, [1])
    assert "closed" in repr(pool)


def test_cancelling_a_queued_future_keeps_it_from_running(tmp_path: pathlib.Path) -> None:
    gate = tmp_path / "gate"

    def wait_then_mark(x: int) -> int:
        deadline = time.monotonic() + 30
        while x == 0 and not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.005)  # the task's own wait on the gate file
        (tmp_path / f"ran-{x}").touch()
        return x

    with escala.Pool("processes", workers=1) as pool:
        first = pool.submit(wait_then_mark, 0)
        queued = pool.submit(wait_then_mark, 1)
        assert queued.cancel()
        gate.touch()
        assert first.result(timeout=30) == 0
    assert not (tmp_path / "ran-1").exists()


def test_worker_settings_are_fixed_at_creation() -> None:
    with (
        escala.Pool("threads", workers=2) as pool,
        pytest.raises(TypeError, match="fixed when the pool is created"),
    ):
        pool.map(abs, [1], workers=3)  # type: ignore[call-arg]


def test_pool_timeout_applies_to_submit() -> None:
    with escala.Pool("processes", workers=1, timeout=0.3) as pool:
        with pytest.raises(escala.TaskTimeout):
            pool.submit(time.sleep, 3600).result(timeout=30)
        assert pool.submit(abs, -4).result(timeout=30) == 4


def test_async_pool_runs_plain_functions_on_threads() -> None:
    with escala.Pool("async", workers=4) as pool:
        assert pool.submit(add, 2, 3).result(timeout=30) == 5
        assert pool.submit(aadd, 2, 3).result(timeout=30) == 5
        assert pool.map(abs, [-1, -2]) == [1, 2]


def test_pool_properties() -> None:
    with escala.Pool("threads", workers=3) as pool:
        assert pool.mode == "threads"
        assert pool.workers == 3
        assert "open" in repr(pool)


def test_auto_batching_sends_trivial_tasks_in_few_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 trivial calls must not cost 100,000 round trips to the workers."""
    from escala._core import run
    from escala._core.scheduler import Scheduler

    made: list[Scheduler] = []
    original = run.make_scheduler

    def recording(*args: Any, **kwargs: Any) -> Scheduler:
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(run, "make_scheduler", recording)
    with escala.Pool("processes", workers=2) as pool:
        assert pool.map(abs, range(100_000)) == list(range(100_000))
    (sched,) = made
    assert sched.batches_sent < 200
    assert sched.sizer.size > 1000


def test_many_cancelled_futures_never_hold_up_later_ones() -> None:
    """Cancelled submissions must not be confused with later ones (their sinks die and
    memory is reused): every later future still completes, and the pool does not keep a
    record of every cancellation forever (white-box: the threads backend's registry)."""
    import gc

    with escala.Pool("threads", workers=1) as pool:
        for round_ in range(50):
            gate = threading.Event()
            blocker = pool.submit(gate.wait, 30)
            cancelled = [pool.submit(abs, -i) for i in range(5)]
            assert all(f.cancel() for f in cancelled)
            del cancelled
            gc.collect()
            later = [pool.submit(abs, -i) for i in range(5)]
            gate.set()
            assert blocker.result(timeout=30) is True
            assert [f.result(timeout=30) for f in later] == [0, 1, 2, 3, 4], round_
        assert len(pool._backend._cancelled) <= 5  # type: ignore[attr-defined]
