"""Breaking things on purpose: dead workers, and objects that will not cross a process boundary.

Modelled on loky's crash table: each row is a way for a task to break the machinery rather
than raise. Every one must end in a clear error for that task, the rest of the run intact.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import pathlib
import signal
import threading
from typing import Any

import pytest

import escala


def exit_three(x: int) -> int:
    if x == 2:
        os._exit(3)
    return x


def segfault(x: int) -> int:
    if x == 2:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x


def sigkill_self(x: int) -> int:
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    return x


@pytest.mark.parametrize(
    ("task", "exitcode", "words"),
    [
        (exit_three, 3, "exited with code 3"),
        (segfault, -signal.SIGSEGV, "SIGSEGV"),
        (sigkill_self, -signal.SIGKILL, "out-of-memory"),
    ],
    ids=["os._exit", "segfault", "SIGKILL"],
)
def test_a_dying_worker_fails_only_its_task(task: Any, exitcode: int, words: str) -> None:
    # pytest's faulthandler, inherited through fork, would print the segfault's stack
    outcomes = escala.map(
        task,
        range(8),
        mode="processes",
        workers=2,
        errors="collect",
        initializer=faulthandler.disable,
    )
    assert [o.ok for o in outcomes] == [x != 2 for x in range(8)]
    error = outcomes[2].error
    assert isinstance(error, escala.WorkerDied)
    assert error.exitcode == exitcode
    assert error.index == 2
    assert words in str(error)
    assert "task #2" in str(error)


def test_worker_death_raises_by_default() -> None:
    with pytest.raises(escala.WorkerDied, match="SIGKILL"):
        escala.map(sigkill_self, range(5), mode="processes")


def test_a_death_inside_a_batch_spares_its_batch_mates() -> None:
    outcomes = escala.map(exit_three, range(10), mode="processes", batch=5, errors="collect")
    assert [o.ok for o in outcomes] == [x != 2 for x in range(10)]


def test_a_death_loses_nothing_queued_behind_it() -> None:
    """One worker, small batches: the next batch already waits in the worker's pipe when
    the task dies; it must be sent again, not lost."""
    outcomes = escala.map(
        sigkill_self, range(24), mode="processes", workers=1, batch=3, errors="collect"
    )
    assert [o.ok for o in outcomes] == [x != 2 for x in range(24)]
    assert [o.value for o in outcomes if o.ok] == [x for x in range(24) if x != 2]


def test_a_task_that_killed_its_worker_is_retried(tmp_path: pathlib.Path) -> None:
    def die_once(x: int) -> int:
        marker = tmp_path / f"{x}"
        if x == 1 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 2

    outcomes = escala.map(die_once, range(4), mode="processes", retries=1, errors="collect")
    assert [o.value for o in outcomes] == [0, 2, 4, 6]
    assert outcomes[1].attempts == 2


def test_the_pool_replaces_dead_workers_and_goes_on() -> None:
    with escala.Pool("processes", workers=2) as pool:
        pids_before = set(pool.map(_pid, range(20)))
        with pytest.raises(escala.WorkerDied):
            pool.submit(os._exit, 1).result(timeout=30)
        pids_after = set(pool.map(_pid, range(20)))
        assert len(pids_after) >= 1
        assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
    assert pids_before != pids_after or len(pids_before) == 2


def _pid(_: int) -> int:
    return os.getpid()


# -- objects that will not cross --------------------------------------------------------


def _refuse(*_: object) -> None:
    raise RuntimeError("refusing to be rebuilt")


class UnpicklesWithError:
    """Pickles fine; raises when the worker (or the caller) unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ())


class UnpicklesIntoDeath:
    """Pickles fine; kills the process that unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os._exit, (7,))


def return_it(x: Any) -> Any:
    return x


def return_lock(x: Any) -> Any:
    return threading.Lock() if x == "bad" else x


def return_unpicklable_in_parent(x: Any) -> Any:
    return UnpicklesWithError() if x == "bad" else x


CRASH_TABLE = [
    # (id, function, the bad item, expected error type, words in the message)
    ("arg-fails-to-pickle", return_it, threading.Lock(), escala.SendError, "cannot be sent"),
    ("arg-fails-to-unpickle", return_it, UnpicklesWithError(), escala.SendError, "loaded"),
    ("arg-unpickling-kills-worker", return_it, UnpicklesIntoDeath(), escala.WorkerDied, "code 7"),
    ("result-fails-to-pickle", return_lock, "bad", escala.SendError, "cannot be sent back"),
    ("result-fails-to-unpickle", return_unpicklable_in_parent, "bad", escala.SendError, "rebuilt"),
]


@pytest.mark.parametrize(
    ("fn", "bad", "error_type", "words"),
    [row[1:] for row in CRASH_TABLE],
    ids=[row[0] for row in CRASH_TABLE],
)
@pytest.mark.parametrize("batch", [1, 4], ids=["batch1", "batch4"])
def test_crash_table(
    fn: Any, bad: Any, error_type: type[Exception], words: str, batch: int
) -> None:
    items = ["a", "b", bad, "c", "d", "e"]
    outcomes = escala.map(fn, items, mode="processes", batch=batch, errors="collect")
    assert [o.ok for o in outcomes] == [True, True, False, True, True, True]
    assert [o.value for o in outcomes if o.ok] == ["a", "b", "c", "d", "e"]
    error = outcomes[2].error
    assert isinstance(error, error_type), repr(error)
    assert words in str(error)
    assert "#2" in str(error)


def test_an_unsendable_argument_is_named_before_work_is_lost() -> None:
    with pytest.raises(escala.SendError) as info:
        escala.map(return_it, [1, threading.Lock(), 3], mode="processes")
    message = str(info.value)
    assert "task #1" in message
    assert "lock" in message.lower()
    assert "mode='threads'" in message


def test_a_function_that_cannot_be_sent_says_so() -> None:
    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(escala.SendError, match="uses_lock cannot be sent to a worker process"):
        escala.map(uses_lock, [1], mode="processes")
    # the same function is fine on threads, which share memory
    assert escala.map(uses_lock, [1, 2], mode="threads") == [1, 2]


class RefusesToLoad:
    """A callable that pickles but cannot be rebuilt in the worker."""

    def __call__(self, x: int) -> int:
        return x

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ())


def test_a_function_that_cannot_be_loaded_in_the_worker() -> None:
    with pytest.raises(escala.SendError, match="could not be loaded"):
        escala.map(RefusesToLoad(), [1, 2, 3], mode="processes")


def test_a_failing_initializer_breaks_the_run_clearly(mode: str) -> None:
    def bad_init() -> None:
        raise OSError("database unreachable")

    with pytest.raises(escala.BrokenWorker, match="database unreachable"):
        escala.map(abs, range(5), mode=mode, initializer=bad_init)


def test_a_failed_start_stops_the_workers_already_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fork fails for the third worker (no more processes, say): the first two must go."""
    from escala.backends.processes import ProcessBackend

    spawn = ProcessBackend._spawn
    started: list[int] = []

    def spawn_twice(self: ProcessBackend) -> Any:
        if len(started) == 2:
            raise OSError(11, "Resource temporarily unavailable")
        worker = spawn(self)
        started.append(worker.process.pid)
        return worker

    monkeypatch.setattr(ProcessBackend, "_spawn", spawn_twice)
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        escala.map(abs, range(10), mode="processes", workers=3)
    assert len(started) == 2  # and nothing_left_behind checks that they are gone


def test_a_function_that_cannot_be_loaded_fails_every_batch_clearly() -> None:
    """The worker keeps the failure: later batches of the same function, sent without the
    function's bytes, must fail the same way rather than kill the worker."""
    outcomes = escala.map(
        RefusesToLoad(), range(6), mode="processes", workers=1, batch=1, errors="collect"
    )
    assert all(isinstance(o.error, escala.SendError) for o in outcomes)
    assert all("could not be loaded" in str(o.error) for o in outcomes)
