"""Breaking things on purpose: dead workers, and objects that will not cross a process boundary.

Modelled on loky's crash table: each row is a way for a task to break the machinery rather
than raise. Every one must end in a clear error for that task, the rest of the run intact.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import faulthandler
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
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


# -- what a task may raise: BaseException, StopIteration, in every mode ----------------


class NeedsTwo(Exception):
    """An exception that plain pickle cannot rebuild (its __init__ wants two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a} and {b}")


def _misbehave(how: str, x: int) -> Any:
    if x != 1:
        return x
    if how == "KeyboardInterrupt":
        raise KeyboardInterrupt("raised by the task")
    if how == "GeneratorExit":
        raise GeneratorExit()
    if how == "SystemExit(3)":
        raise SystemExit(3)
    if how == "sys.exit(4)":
        sys.exit(4)
    if how == "StopIteration":
        return next(iter([]))  # the everyday one: next() on an empty iterator
    if how == "CancelledError":
        raise asyncio.CancelledError()
    if how == "NeedsTwo":
        raise NeedsTwo(1, 2)
    if how == "unpicklable result":
        return threading.Lock()
    raise AssertionError(how)


def misbehave(how: str) -> Any:
    """Item 1 misbehaves as ``how`` says; the others return themselves."""
    return functools.partial(_misbehave, how)


async def _amisbehave(how: str, x: int) -> Any:
    await asyncio.sleep(0)
    return _misbehave(how, x)


def task_for(mode: str, how: str) -> Any:
    """The misbehaving task as ``mode`` runs it (async mode runs coroutine functions)."""
    if mode == "async":
        return functools.partial(_amisbehave, how)
    return misbehave(how)


RAISES = {
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "SystemExit(3)": SystemExit,
    "sys.exit(4)": SystemExit,
    "StopIteration": StopIteration,
    "CancelledError": asyncio.CancelledError,
    "NeedsTwo": NeedsTwo,
}
CROSSES = {"processes", "dask", "ray"}  # the exception is pickled back to the caller


def _expected(mode: str, how: str) -> tuple[type[BaseException], ...]:
    if how == "StopIteration" and mode == "async":
        # an async def cannot let StopIteration out: Python turns it into this (PEP 479)
        return (RuntimeError,)
    if how == "NeedsTwo" and mode in CROSSES:
        return (NeedsTwo, escala.RemoteError)  # rebuilt by cloudpickle, or described
    return (RAISES[how],)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", list(RAISES))
def test_what_a_task_raises_is_its_outcome(mode: str, how: str) -> None:
    outcomes = escala.map(task_for(mode, how), range(4), mode=mode, workers=2, errors="collect")
    assert [o.ok for o in outcomes] == [True, False, True, True]
    assert [o.value for o in outcomes if o.ok] == [0, 2, 3]
    error = outcomes[1].error
    assert isinstance(error, _expected(mode, how)), repr(error)
    if how == "SystemExit(3)":
        assert isinstance(error, SystemExit) and error.code == 3
    if how == "sys.exit(4)":
        assert isinstance(error, SystemExit) and error.code == 4
    if how == "StopIteration" and mode == "async":
        assert isinstance(error.__cause__, StopIteration)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", list(RAISES))
def test_what_a_task_raises_reaches_the_caller_with_its_index(mode: str, how: str) -> None:
    with pytest.raises(_expected(mode, how)) as info:
        escala.map(task_for(mode, how), range(4), mode=mode, workers=2)
    notes = getattr(info.value, "__notes__", [])
    assert any("task #1" in note for note in notes) or "task #1" in str(info.value), notes


@pytest.mark.timeout(60)
def test_a_result_that_cannot_be_pickled(mode: str) -> None:
    outcomes = escala.map(
        task_for(mode, "unpicklable result"), range(4), mode=mode, workers=2, errors="collect"
    )
    if mode in CROSSES:
        assert [o.ok for o in outcomes] == [True, False, True, True]
        assert isinstance(outcomes[1].error, escala.SendError)
        assert "task #1" in str(outcomes[1].error)
    else:  # nothing crosses a process boundary: the lock is the result
        assert all(o.ok for o in outcomes)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["KeyboardInterrupt", "GeneratorExit", "StopIteration"])
def test_a_task_failure_in_a_batch_spares_the_rest_of_it(how: str) -> None:
    """The batch fast path (one call, no timeout): each failure is one task's, none runs
    twice, and the batch goes on after it (a StopIteration once ended it and ran it again)."""
    calls = collections.Counter[int]()

    def counted(x: int) -> Any:
        calls[x] += 1
        return _misbehave(how, x % 4)

    outcomes = escala.map(counted, range(40), mode="sequential", batch=20, errors="collect")
    assert [o.ok for o in outcomes] == [x % 4 != 1 for x in range(40)]
    assert all(isinstance(o.error, RAISES[how]) for o in outcomes if not o.ok)
    assert calls == collections.Counter(range(40))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SystemExit(3)"])
def test_base_exceptions_are_not_retried_by_default(mode: str, how: str) -> None:
    outcomes = escala.map(
        task_for(mode, how), range(4), mode=mode, workers=2, retries=2, errors="collect"
    )
    assert outcomes[1].attempts == 1
    assert isinstance(outcomes[1].error, RAISES[how])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["KeyboardInterrupt", "GeneratorExit", "SystemExit(3)"])
def test_a_pool_future_carries_what_the_task_raised(mode: str, how: str) -> None:
    with escala.Pool(mode, workers=2) as pool:
        future = pool.submit(task_for(mode, how), 1)
        assert isinstance(future.exception(timeout=30), RAISES[how])
        assert pool.submit(task_for(mode, how), 2).result(timeout=30) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SystemExit(3)", "GeneratorExit"])
def test_an_initializer_that_raises_a_base_exception_breaks_the_run_clearly(
    mode: str, how: str
) -> None:
    with pytest.raises(escala.BrokenWorker) as info:
        escala.map(abs, range(4), mode=mode, workers=2, initializer=_misbehave, initargs=(how, 1))
    cause = info.value.__cause__
    if mode in CROSSES:  # the worker's traceback, as text
        assert isinstance(cause, escala.RemoteTraceback)
        assert f"\n{RAISES[how].__name__}" in cause.tb
    else:
        assert isinstance(cause, RAISES[how]), repr(cause)
    assert RAISES[how].__name__ in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["imap", "amap", "aimap"])
def test_an_iterator_of_results_says_what_a_stop_iteration_was(api: str, mode: str) -> None:
    """``for r in escala.imap(...)`` cannot be handed a StopIteration: it would end the loop
    as if all results were in. It comes as the cause of an error that says so."""
    fn = misbehave("StopIteration")  # a plain function: amap runs it on threads, or as mode says

    async def consume() -> list[Any]:
        if api == "amap":
            return await escala.amap(fn, range(4), mode=mode, workers=2)
        return [r async for r in escala.aimap(fn, range(4), mode=mode, workers=2)]

    def run() -> list[Any]:
        if api == "imap":
            return list(escala.imap(fn, range(4), mode=mode, workers=2))
        return asyncio.run(consume())

    with pytest.raises(RuntimeError, match="task #1 raised StopIteration") as info:
        run()
    assert isinstance(info.value.__cause__, StopIteration)


# -- tasks that change the process around them ---------------------------------------
#
# Each case runs in a fresh interpreter (a task that forks, or closes fd 1, must not do it
# to the test process): the script maps a hostile task over range(4) and reports on
# stderr. A forked child that ran on into the script would report a second time.

HOSTILE = textwrap.dedent(
    r"""
    import asyncio, faulthandler, json, os, signal, sys, threading
    import psutil
    import escala

    CASE, MODE = sys.argv[1], sys.argv[2]
    ME = os.getpid()
    forked = []

    class Haunted:
        def __init__(self, x):
            self.x = x
        def __del__(self):
            raise ValueError("raised from __del__")
        def __reduce__(self):
            return (Haunted, (self.x,))

    def hostile(x):
        if x == 1:
            if CASE == "fork":
                pid = os.fork()
                if pid:
                    forked.append(pid)
            elif CASE == "close-stdout":
                os.close(1)
            elif CASE == "signal":
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # ValueError off the main thread
            elif CASE == "excepthook":
                def hook(args):
                    raise RuntimeError("a broken excepthook")
                threading.excepthook = hook
                raise ValueError("and then the task fails")
            elif CASE == "settrace":
                sys.settrace(lambda *args: None)
            elif CASE == "faulthandler":
                faulthandler.enable()
                faulthandler.dump_traceback(all_threads=True)
            elif CASE == "non-daemon-thread":
                threading.Thread(target=threading.Event().wait, args=(30,), daemon=False).start()
            elif CASE == "del-raises":
                return Haunted(x)
        return x

    async def ahostile(x):
        return hostile(x)

    fn = ahostile if MODE == "async" else hostile
    outcomes = escala.map(fn, range(4), mode=MODE, workers=2, errors="collect")
    report = {
        "pid": os.getpid(),
        "ok": [o.ok for o in outcomes],
        "errors": [type(o.error).__name__ for o in outcomes if not o.ok],
        "values": [getattr(o.value, "x", o.value) for o in outcomes if o.ok],
        "children": [
            p.pid for p in psutil.Process().children(recursive=True)
            if p.pid not in forked and "multiprocessing" not in " ".join(p.cmdline())
        ],
    }
    for pid in forked:  # the child the task forked is ours to reap
        report["child_exit"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    sys.stderr.write("REPORT " + json.dumps(report) + "\n")
    sys.stderr.flush()
    os._exit(0)  # a non-daemon thread the task left would hold a normal exit for 30 s
    """
)

HOSTILE_CASES = [
    "fork",
    "close-stdout",
    "signal",
    "excepthook",
    "settrace",
    "faulthandler",
    "non-daemon-thread",
    "del-raises",
]


def _run_hostile(case: str, mode: str) -> list[dict[str, Any]]:
    child = subprocess.run(
        [sys.executable, "-c", HOSTILE, case, mode],
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return [
        json.loads(line.removeprefix("REPORT "))
        for line in child.stderr.splitlines()
        if line.startswith("REPORT ")
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", HOSTILE_CASES)
@pytest.mark.parametrize("mode", list(escala.MODES))
def test_a_task_that_changes_its_process_does_not_break_the_run(mode: str, case: str) -> None:
    reports = _run_hostile(case, mode)
    assert len(reports) == 1, f"the script reported {len(reports)} times: {reports}"
    report = reports[0]
    assert report["children"] == [], "worker processes outlived the run"
    if case == "excepthook" or (case == "signal" and mode == "threads"):
        # the task failed (signal.signal off the main thread raises ValueError); the rest
        # ran (map runs async tasks on the caller's loop, here the main thread)
        assert report["ok"] == [True, False, True, True]
        assert report["errors"] == ["ValueError"]
    else:
        assert report["ok"] == [True] * 4
        assert report["values"] == [0, 1, 2, 3]
    if case == "fork" and mode != "processes":  # under processes a worker is the parent
        assert report["child_exit"] == 0
