"""Errors: the task's own exception comes back, with the worker's traceback; or all outcomes."""

from __future__ import annotations

import pathlib
import pickle
import threading
import traceback

import pytest

import escala
from escala import _auto
from escala._worker.messages import Batch, Call


class Boom(Exception):
    pass


def explode_on_three(x: int) -> int:
    if x == 3:
        raise Boom(f"bad item {x}")
    return x


def test_first_error_is_raised_as_itself(mode: str) -> None:
    with pytest.raises(Boom, match="bad item 3") as info:
        escala.map(explode_on_three, range(10), mode=mode)
    assert info.value.args == ("bad item 3",)


def test_worker_traceback_is_the_cause_in_processes_mode() -> None:
    with pytest.raises(Boom) as info:
        escala.map(explode_on_three, range(10), mode="processes")
    cause = info.value.__cause__
    assert isinstance(cause, escala.RemoteTraceback)
    assert "explode_on_three" in cause.tb
    assert 'raise Boom(f"bad item {x}")' in cause.tb
    assert any("task #3" in note for note in info.value.__notes__)
    printed = "".join(traceback.format_exception(info.value))
    assert "The above exception was the direct cause" in printed
    assert "explode_on_three" in printed


def test_the_traceback_leads_to_the_failing_line(mode: str) -> None:
    """In-process modes keep the real traceback; processes mode brings it back as text."""
    with pytest.raises(Boom) as info:
        escala.map(explode_on_three, range(10), mode=mode)
    if mode in ("processes", "dask", "ray"):
        assert isinstance(info.value.__cause__, escala.RemoteTraceback)
        assert "in explode_on_three" in info.value.__cause__.tb
    else:
        frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
        assert "explode_on_three" in frames


def test_first_error_cancels_what_is_left(mode: str, tmp_path: pathlib.Path) -> None:
    """After the failure, the run stops pulling and cancels queued work."""

    def record(x: int) -> int:
        (tmp_path / f"{x}").touch()
        if x == 0:
            raise Boom("first")
        return x

    with pytest.raises(Boom):
        escala.map(record, range(10_000), mode=mode, workers=2, batch=1)
    ran = len(list(tmp_path.iterdir()))
    assert ran < 10_000
    # the window (8 tasks) plus whatever was running, with room; which ones, if not
    ran_items = sorted(int(p.name) for p in tmp_path.iterdir())
    assert ran <= 100, f"{ran} tasks ran: {ran_items[:20]} ... {ran_items[-20:]}"


def test_collect_returns_every_outcome_and_keeps_going(mode: str) -> None:
    outcomes = escala.map(explode_on_three, range(6), mode=mode, errors="collect")
    assert [o.index for o in outcomes] == list(range(6))
    assert [o.item for o in outcomes] == list(range(6))
    assert [o.ok for o in outcomes] == [True, True, True, False, True, True]
    assert [o.value for o in outcomes if o.ok] == [0, 1, 2, 4, 5]
    failed = outcomes[3]
    assert isinstance(failed.error, Boom)
    assert failed.attempts == 1
    with pytest.raises(Boom):
        failed.unwrap()
    assert outcomes[4].unwrap() == 4


def test_imap_collect_streams_outcomes(mode: str) -> None:
    outcomes = list(escala.imap(explode_on_three, range(6), mode=mode, errors="collect"))
    assert [o.ok for o in outcomes] == [True, True, True, False, True, True]


def test_error_from_a_generator_input_is_raised(mode: str) -> None:
    def items() -> object:
        yield 1
        yield 2
        raise ValueError("the input itself broke")

    with pytest.raises(ValueError, match="the input itself broke"):
        escala.map(str, items(), mode=mode)  # type: ignore[call-overload]


def test_system_exit_in_a_task_is_a_task_failure(mode: str) -> None:
    def leave(x: int) -> int:
        raise SystemExit(x)

    outcomes = escala.map(leave, [7], mode=mode, errors="collect")
    assert isinstance(outcomes[0].error, SystemExit)
    assert outcomes[0].error.code == 7


# -- exceptions that do not survive the trip ------------------------------------------


class NeedsTwoArgs(Exception):
    """Pickles, but fails to unpickle: ``args`` holds one value, ``__init__`` wants two."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


class HoldsALock(Exception):
    def __init__(self) -> None:
        super().__init__("holding a lock")
        self.lock = threading.Lock()


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def raise_needs_two(x: int) -> None:
    raise NeedsTwoArgs(x, x + 1)


def raise_holds_lock(x: int) -> None:
    raise HoldsALock()


def raise_bad_str(x: int) -> None:
    raise BadStr()


@pytest.mark.parametrize(
    ("fn", "type_name", "text"),
    [
        (raise_needs_two, "NeedsTwoArgs", "1-2"),
        (raise_holds_lock, "HoldsALock", "holding a lock"),
    ],
    ids=["fails-to-unpickle", "fails-to-pickle"],
)
def test_exceptions_that_cannot_travel_come_back_faithfully(
    fn: object, type_name: str, text: str
) -> None:
    with pytest.raises(escala.RemoteError) as info:
        escala.map(fn, [1], mode="processes")  # type: ignore[call-overload]
    error = info.value
    assert error.type_name.endswith(type_name)
    assert text in str(error)
    assert error.index == 0
    assert isinstance(error.__cause__, escala.RemoteTraceback)
    assert type_name in error.__cause__.tb
    # and the pool is still usable afterwards: the next run works
    assert escala.map(abs, [-1, -2], mode="processes") == [1, 2]


def test_exception_with_a_broken_str_still_comes_back_as_itself(mode: str) -> None:
    with pytest.raises(BadStr):
        escala.map(raise_bad_str, [1], mode=mode)


def test_unpicklable_exception_in_collect_mode_leaves_the_rest_intact() -> None:
    def sometimes(x: int) -> int:
        if x == 2:
            raise HoldsALock()
        return x

    outcomes = escala.map(sometimes, range(5), mode="processes", errors="collect", batch=5)
    assert [o.ok for o in outcomes] == [True, True, False, True, True]
    assert isinstance(outcomes[2].error, escala.RemoteError)


# -- errors write their own message ---------------------------------------------------------


def test_a_task_timeout_writes_its_message_and_survives_pickling() -> None:
    error = escala.TaskTimeout(3, 0.5, stopped=False, how="it goes on", took=0.75)
    assert str(error) == (
        "task #3 ran past its 0.5s timeout (it took 0.75s); it goes on. "
        "Use mode='processes' to stop runaway tasks."
    )
    back = pickle.loads(pickle.dumps(error))
    assert isinstance(back, escala.TaskTimeout) and isinstance(back, TimeoutError)
    assert (str(back), back.index, back.timeout, back.stopped) == (str(error), 3, 0.5, False)
    stopped = escala.TaskTimeout(None, 2, stopped=True, how="it was cancelled")
    assert str(stopped) == "a task ran past its 2s timeout; it was cancelled"


def test_auto_words_its_timeout_like_the_modes() -> None:
    batch = Batch(Call(abs, timeout=0.25), [7], [1])
    error = _auto._timeout_error(batch, 0, 0.25)
    assert str(error).startswith("task #7 ran past its 0.25s timeout; mode='auto' was measuring")
    assert str(error).endswith("Use mode='processes' to stop runaway tasks.")
    assert (error.index, error.timeout, error.stopped) == (7, 0.25, False)


def test_a_dead_worker_says_how_it_ended() -> None:
    killed = escala.WorkerDied(2, worker="worker process 41", exitcode=-9, pid=41)
    assert str(killed).startswith("the worker process 41 running task #2 was killed by SIGKILL")
    assert "out-of-memory" in str(killed)
    engine = escala.WorkerDied(
        5, worker="Ray worker", exitcode=None, pid=0, how="died (WorkerCrashedError)"
    )
    assert str(engine).startswith("the Ray worker running task #5 died (WorkerCrashedError). ")
    assert "out-of-memory" in str(engine)
    back = pickle.loads(pickle.dumps(killed))
    assert (str(back), back.index, back.exitcode, back.pid) == (str(killed), 2, -9, 41)


def test_the_other_errors_write_their_message_once() -> None:
    unloadable = escala.SendError.unloadable(
        4, what="result", why="could not be rebuilt", error="E: x", workers="the workers"
    )
    assert str(unloadable).startswith("the result of task #4 could not be rebuilt: E: x. ")
    assert unloadable.index == 4
    assert str(escala.PoolClosed()) == "this pool is shut down; create a new one"
    broken = escala.BrokenWorker.initializer("ValueError: no", where="a worker thread")
    assert str(broken) == "the initializer failed in a worker thread: ValueError: no"
