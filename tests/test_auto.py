"""mode="auto" and escala.advise: measure, choose, explain, and never run a task twice."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import re
import sys
import threading
import time
from typing import Any

import pytest

import escala
from escala.advisor import Reason

# -- workloads of known shape -----------------------------------------------------------


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def spin_15ms(_: int) -> int:
    return spin(400_000)


def wait_20ms(x: int) -> int:
    time.sleep(0.02)
    return x


_BUFFER = bytes(range(256)) * 62_500  # 16 MB, made once: hashing it releases the GIL


def hash_big(seed: int) -> str:
    digest = hashlib.sha256(_BUFFER)  # no copy of the buffer: all of it hashed without the GIL
    digest.update(bytes([seed % 256]))
    return digest.hexdigest()


def inc(x: int) -> int:
    return x + 1


async def await_a_bit(x: int) -> int:
    await asyncio.sleep(0.001)
    return x


# -- the choice --------------------------------------------------------------------------


def test_waiting_work_goes_to_threads_with_a_measured_count() -> None:
    advice = escala.advise(wait_20ms, range(60))
    assert advice.mode == "threads"
    assert advice.reason is Reason.WAITS
    assert advice.adaptive
    assert advice.measured is not None
    assert advice.measured.cpu_share < 0.2
    assert 2 <= advice.workers <= 60
    text = advice.explain()
    assert "of wall time: this work waits on I/O, so threads were chosen" in text
    assert f"{advice.measured.cores} cores ×" in text or "1 core ×" in text


def test_computing_python_goes_to_processes_one_per_core() -> None:
    if escala.usable_cpus() < 2:
        pytest.skip("needs two usable cores")
    advice = escala.advise(spin_15ms, range(32))
    assert advice.mode == "processes"
    assert advice.reason is Reason.HOLDS_GIL
    assert advice.workers == escala.usable_cpus()
    assert advice.measured is not None and advice.measured.gil_held is True
    assert "holding the GIL: only processes run it on several cores" in advice.explain()
    assert f"one per core ({advice.workers})" in advice.explain()


def test_code_that_releases_the_gil_goes_to_threads() -> None:
    if escala.usable_cpus() < 2:
        pytest.skip("needs two usable cores")
    advice = escala.advise(hash_big, range(32))
    assert advice.mode == "threads"
    assert advice.reason is Reason.RELEASES_GIL
    assert advice.measured is not None and advice.measured.gil_held is False
    assert "it releases the GIL" in advice.explain()


def test_trivial_tasks_stay_sequential() -> None:
    for n in (100_000, 5_000_000):  # a whole job too small to pay, or tasks too short to
        advice = escala.advise(inc, range(n))
        assert advice.mode == "sequential"
        assert advice.reason is Reason.TOO_SMALL
        assert "sequential was chosen" in advice.explain().lower()
        assert re.search(r"\d\.\d\d µs per task", advice.explain())  # the figure, shown


def test_coroutine_functions_go_to_async_without_measuring() -> None:
    advice = escala.advise(await_a_bit, range(10))
    assert (advice.mode, advice.reason, advice.measured) == ("async", Reason.COROUTINE, None)
    assert "coroutine function" in advice.explain()


def test_a_hint_skips_measuring() -> None:
    ran: list[int] = []

    @escala.task(kind="io")
    def fetch(x: int) -> int:
        ran.append(x)
        return x

    advice = escala.advise(fetch, range(10))
    assert (advice.mode, advice.reason, advice.measured) == ("threads", Reason.HINT_IO, None)
    assert ran == []  # nothing ran: no measuring
    assert 'kind="io"' in advice.explain()


def test_work_that_cannot_be_pickled_never_goes_to_processes() -> None:
    if escala.usable_cpus() < 2:
        pytest.skip("needs two usable cores")
    lock = threading.Lock()

    def spin_with_lock(n: int) -> int:
        with lock:
            return spin_15ms(n)

    advice = escala.advise(spin_with_lock, range(32))
    assert advice.mode == "sequential"
    assert advice.reason is Reason.NOT_PICKLABLE
    assert "cannot be pickled" in advice.explain()


def test_a_free_threaded_build_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    advice = escala.advise(spin_15ms, range(32))
    assert advice.measured is not None and advice.measured.free_threaded
    assert advice.mode == "threads"
    assert "no GIL" in advice.explain()


# -- the run -------------------------------------------------------------------------------


class Runs:
    """Counts each run of each item, in this process and in worker processes alike.

    In this process (sequential, threads) a list under a lock; from worker processes a
    marker file per run (a list would be the worker's own copy). Counting must not change
    the work's nature: a file per trivial task would make it I/O.
    """

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.pid = os.getpid()
        self.here: list[int] = []
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "pid": self.pid}  # a worker counts in files only

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, here=[], lock=threading.Lock())

    def note(self, x: int) -> None:
        if os.getpid() == self.pid:
            with self.lock:
                self.here.append(x)
        else:
            (self.folder / f"{x}-{os.getpid()}-{time.perf_counter_ns()}").touch()

    def all(self) -> list[int]:
        there = [int(name.split("-")[0]) for name in os.listdir(self.folder)]
        return sorted(self.here + there)


def counted(runs: Runs, work: Any) -> Any:
    def task(x: int) -> Any:
        runs.note(x)
        return work(x)

    return task


@pytest.mark.parametrize(
    ("work", "n", "expected"),
    [
        (inc, 3000, "sequential"),
        (wait_20ms, 40, "threads"),
        (spin_15ms, 16, "processes"),
    ],
    ids=["sequential", "threads", "processes"],
)
def test_no_task_runs_twice_because_it_was_measured(
    tmp_path: pathlib.Path, work: Any, n: int, expected: str
) -> None:
    if expected == "processes" and escala.usable_cpus() < 2:
        pytest.skip("needs two usable cores")
    chosen: list[escala.Advice] = []
    from escala._auto import run_auto
    from escala._options import Options
    from escala._plan import collect

    runs = Runs(tmp_path)
    task = counted(runs, work)
    opts = Options(mode="auto")
    results = collect(run_auto(task, range(n), opts, ordered=False, on_advice=chosen.append))
    assert results == [work(x) for x in range(n)]
    assert chosen[0].mode == expected, f"{chosen[0].measured}\n{chosen[0].explain()}"
    assert runs.all() == list(range(n))  # each item exactly once


def test_auto_is_the_default_and_returns_the_same_results() -> None:
    assert escala.map(spin, [10_000] * 12) == [spin(10_000)] * 12
    assert list(escala.imap(wait_20ms, range(30))) == list(range(30))
    assert escala.map(inc, range(5000), mode="auto") == [x + 1 for x in range(5000)]


def test_imap_auto_streams_an_endless_input() -> None:
    def naturals() -> Any:
        n = 0
        while True:
            yield n
            n += 1

    results = escala.imap(inc, naturals())
    assert [next(results) for _ in range(10_000)] == list(range(1, 10_001))
    results.close()  # type: ignore[attr-defined]


def test_errors_in_sampled_items_follow_the_error_policy() -> None:
    def fail_first(x: int) -> int:
        if x == 0:
            raise KeyError("the very first item")
        return x

    with pytest.raises(KeyError, match="the very first item"):
        escala.map(fail_first, range(100))
    outcomes = escala.map(fail_first, range(100), errors="collect")
    assert not outcomes[0].ok
    assert [o.value for o in outcomes[1:]] == list(range(1, 100))


def test_a_sampled_failure_is_retried_like_any_other(tmp_path: pathlib.Path) -> None:
    def flaky(x: int) -> int:
        marker = tmp_path / str(x)
        if x == 0 and not marker.exists():
            marker.touch()
            raise ConnectionError("once")
        return x

    outcomes = escala.map(
        flaky, range(50), retries=escala.Retry(1, backoff=0.001), errors="collect"
    )
    assert [o.value for o in outcomes] == list(range(50))
    assert outcomes[0].attempts == 2


def test_an_input_that_breaks_while_sampled_raises_its_error() -> None:
    def items() -> Any:
        yield 1
        raise ValueError("the input broke")

    with pytest.raises(ValueError, match="the input broke"):
        escala.map(inc, items())  # type: ignore[call-overload]


def test_a_task_still_measured_when_it_overruns_its_timeout() -> None:
    release = threading.Event()

    def slow_first(x: int) -> int:
        if x == 0:
            release.wait(30)
        return x

    try:
        outcomes = escala.map(slow_first, range(5), timeout=0.3, errors="collect")
    finally:
        release.set()
    assert isinstance(outcomes[0].error, escala.TaskTimeout)
    assert "measuring" in str(outcomes[0].error)
    assert [o.value for o in outcomes[1:]] == [1, 2, 3, 4]


def test_auto_with_workers_given_keeps_them() -> None:
    advice = escala.advise(wait_20ms, range(60))
    assert advice.mode == "threads"
    results = escala.map(wait_20ms, range(20), workers=5)
    assert results == list(range(20))


def test_a_pool_needs_a_mode_of_its_own() -> None:
    with pytest.raises(ValueError, match="A Pool keeps one kind of worker"):
        escala.Pool(mode="auto")
