"""Per-task timeouts: processes and async really stop the task; threads say they cannot."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import escala

RUNAWAY = 5  # the item that never finishes on its own


@pytest.fixture
def runaway(mode: str) -> Iterator[tuple[Callable[[int], Any], float, threading.Event]]:
    """A task that hangs on item RUNAWAY, built for the mode, with a suitable timeout.

    Threads cannot be stopped, so their runaway waits on an event that the fixture sets
    when the test is over; sequential mode cannot even be abandoned (the task runs in the
    caller), so its runaway only overruns a little.
    """
    release = threading.Event()

    if mode == "async":

        async def task(x: int) -> int:
            if x == RUNAWAY:
                await asyncio.sleep(3600)
            return x

        yield task, 0.3, release
    elif mode == "sequential":

        def task(x: int) -> int:  # type: ignore[misc]
            if x == RUNAWAY:
                time.sleep(0.3)
            return x

        yield task, 0.1, release
    elif mode == "threads":

        def task(x: int) -> int:  # type: ignore[misc]
            if x == RUNAWAY:
                release.wait(60)
            return x

        yield task, 0.3, release
    else:

        def task(x: int) -> int:  # type: ignore[misc]
            if x == RUNAWAY:
                time.sleep(3600)
            return x

        yield task, 0.5, release
    release.set()


def test_a_runaway_task_times_out_and_the_rest_complete(
    mode: str, runaway: tuple[Callable[[int], Any], float, threading.Event]
) -> None:
    task, timeout, _ = runaway
    outcomes = escala.map(task, range(10), mode=mode, timeout=timeout, errors="collect")
    assert [o.ok for o in outcomes] == [x != RUNAWAY for x in range(10)]
    error = outcomes[RUNAWAY].error
    assert isinstance(error, escala.TaskTimeout)
    assert isinstance(error, TimeoutError)
    assert error.timeout == timeout
    assert error.index == RUNAWAY
    assert error.stopped is (mode in ("processes", "async", "dask", "ray"))
    assert f"#{RUNAWAY}" in str(error)


def test_timeout_raises_by_default(
    mode: str, runaway: tuple[Callable[[int], Any], float, threading.Event]
) -> None:
    task, timeout, _ = runaway
    with pytest.raises(escala.TaskTimeout):
        escala.map(task, [RUNAWAY], mode=mode, timeout=timeout)


def test_every_mode_words_its_timeout_the_same_way(
    mode: str, runaway: tuple[Callable[[int], Any], float, threading.Event]
) -> None:
    """TaskTimeout writes its message: each mode adds only what became of the task."""
    task, timeout, _ = runaway
    outcomes = escala.map(task, [0, RUNAWAY], mode=mode, timeout=timeout, errors="collect")
    error = outcomes[1].error
    assert isinstance(error, escala.TaskTimeout)
    message = str(error)
    assert message.startswith(f"task #1 ran past its {timeout:g}s timeout")
    assert "; " in message  # then the mode's own phrase
    advised = message.endswith(". Use mode='processes' to stop runaway tasks.")
    # the advice goes with a task left running on this machine, never on a cluster
    assert advised is (not error.stopped and mode not in ("dask", "ray"))


def test_threads_say_the_task_could_not_be_stopped() -> None:
    release = threading.Event()

    def hang(x: int) -> int:
        release.wait(60)
        return x

    try:
        with pytest.raises(escala.TaskTimeout, match="cannot be stopped") as info:
            escala.map(hang, [1], mode="threads", timeout=0.2)
        assert "mode='processes'" in str(info.value)
        # map returned although the thread still runs: shutdown did not wait for it
        assert any(t.name.startswith("escala-thread") for t in threading.enumerate())
    finally:
        release.set()


def test_processes_kill_the_whole_process_group(tmp_path: pathlib.Path) -> None:
    """The runaway task started a child of its own; the timeout must take it down too."""
    pid_file = tmp_path / "grandchild"

    def spawn_and_hang(x: int) -> int:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        pid_file.write_text(str(child.pid))
        time.sleep(3600)
        return x

    with pytest.raises(escala.TaskTimeout, match="process group"):
        escala.map(spawn_and_hang, [1], mode="processes", timeout=1.0)
    grandchild = int(pid_file.read_text())
    assert _gone(grandchild)


def test_processes_stop_a_busy_loop_too() -> None:
    def spin(x: int) -> int:
        while True:
            x += 1

    outcomes = escala.map(spin, [1], mode="processes", timeout=0.3, errors="collect")
    assert isinstance(outcomes[0].error, escala.TaskTimeout)


def test_the_runaway_is_found_inside_a_batch() -> None:
    """Batching must not blur the timeout: only the runaway fails, its batch mates finish."""

    def task(x: int) -> int:
        if x == RUNAWAY:
            time.sleep(3600)
        return x

    outcomes = escala.map(
        task, range(12), mode="processes", batch=4, workers=2, timeout=0.5, errors="collect"
    )
    assert [o.ok for o in outcomes] == [x != RUNAWAY for x in range(12)]
    assert isinstance(outcomes[RUNAWAY].error, escala.TaskTimeout)


def test_a_timed_out_task_can_be_retried(tmp_path: pathlib.Path) -> None:
    def hang_once(x: int) -> int:
        marker = tmp_path / "hung"
        if not marker.exists():
            marker.touch()
            time.sleep(3600)
        return x

    assert escala.map(hang_once, [3], mode="processes", timeout=0.5, retries=1) == [3]


def test_async_timeout_cancels_the_coroutine() -> None:
    cancelled = threading.Event()

    async def slow(x: int) -> int:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return x

    with pytest.raises(escala.TaskTimeout, match="cancelled"):
        escala.map(slow, [1], mode="async", timeout=0.2)
    assert cancelled.is_set()


def test_a_task_raising_its_own_timeout_error_is_not_our_timeout(mode: str) -> None:
    async def own(x: int) -> int:
        raise TimeoutError("the task's own")

    with pytest.raises(TimeoutError, match="the task's own") as info:
        escala.map(own, [1], mode=mode, timeout=30)
    assert not isinstance(info.value, escala.TaskTimeout)


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True  # dead, waiting for init to reap it
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    os.kill(pid, 9)  # do not leave it behind even when the test fails
    return False
