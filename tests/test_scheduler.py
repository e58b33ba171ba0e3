"""The scheduler on its own: driven step by step with a fake clock, no threads, no sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from escala import Retry
from escala._core.scheduler import BatchSizer, Outcome, Scheduler
from escala._worker.messages import Batch, Call, Done, Failure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    *,
    workers: int = 2,
    batch: int | None = 1,
    ordered: bool = True,
    collect: bool = False,
    retry: Retry | None = None,
    window: int | None = None,
    adaptive: bool = False,
    total: int | None = None,
    clock: Clock | None = None,
) -> Scheduler:
    return Scheduler(
        Call(str),
        workers=workers,
        sizer=BatchSizer(batch, adaptive=adaptive, workers=workers, total=total),
        ordered=ordered,
        collect=collect,
        retry=retry or Retry(),
        window=window,
        clock=clock or Clock(),
        rand=lambda: 1.0,
    )


def ok(batch: Batch, busy: float = 0.0) -> Done:
    return Done(batch, [f"r{i}" for i in batch.indices], busy=busy)


def failed(batch: Batch, pos: int, error: BaseException) -> Done:
    values: list[Any] = [f"r{i}" for i in batch.indices]
    return Done(batch, values, {pos: Failure(error=error)})


def flatten(chunks: list[tuple[Any, list[Any]]]) -> list[Any]:
    return [value for _, values in chunks for value in values]


def test_room_is_the_window_minus_what_is_outstanding() -> None:
    sched = make(workers=2, batch=3)
    assert sched.window == 12
    assert sched.room() == 12
    batches = sched.take(list(range(5)))
    assert [list(b.indices) for b in batches] == [[0, 1, 2], [3, 4]]
    assert sched.room() == 7


def test_ordered_results_wait_for_the_slow_head_and_hold_the_window() -> None:
    sched = make(workers=2, batch=1)  # window 4
    batches = sched.take(list("abcd"))
    for batch in batches[1:]:
        sched.complete(ok(batch))
    assert sched.pop_ready() == []
    assert sched.room() == 0  # three results wait behind item 0: nothing more is pulled
    sched.complete(ok(batches[0]))
    assert flatten(sched.pop_ready()) == ["r0", "r1", "r2", "r3"]
    assert sched.room() == 4


def test_unordered_results_go_out_as_they_come() -> None:
    sched = make(ordered=False)
    batches = sched.take(list("abcd"))
    sched.complete(ok(batches[2]))
    assert sched.pop_ready() == [(range(2, 3), ["r2"])]


def test_end_of_input_and_finished() -> None:
    sched = make()
    batches = sched.take(["a"])
    sched.end_input()
    assert not sched.finished
    sched.complete(ok(batches[0]))
    assert not sched.finished  # still to be handed back
    sched.pop_ready()
    assert sched.finished
    assert sched.room() == 0


def test_first_failure_is_raised_and_nothing_more_is_pulled() -> None:
    sched = make()
    batches = sched.take(list("ab"))
    sched.complete(failed(batches[0], 0, KeyError("x")))
    with pytest.raises(KeyError):
        sched.pop_ready()
    assert sched.room() == 0


def test_a_retry_waits_for_its_backoff_while_others_finish() -> None:
    clock = Clock()
    sched = make(retry=Retry(attempts=1, backoff=5.0), clock=clock, ordered=False)
    batches = sched.take(list("abc"))
    sched.complete(failed(batches[0], 0, ValueError("flaky")))
    sched.complete(ok(batches[1]))
    sched.complete(ok(batches[2]))
    assert flatten(sched.pop_ready()) == ["r1", "r2"]  # the others are not held back
    assert sched.next_due() == 105.0
    assert sched.due(104.9) == []
    (retry,) = sched.due(105.0)
    assert list(retry.indices) == [0]
    assert retry.items == ["a"]
    sched.complete(ok(retry))
    assert flatten(sched.pop_ready()) == ["r0"]


def test_collect_counts_attempts() -> None:
    clock = Clock()
    sched = make(retry=Retry(attempts=1, backoff=0.0), clock=clock, collect=True)
    (batch,) = sched.take(["a"])
    sched.complete(failed(batch, 0, ValueError("1")))
    (retry,) = sched.due(clock.now)
    sched.complete(failed(retry, 0, ValueError("2")))
    (outcome,) = flatten(sched.pop_ready())
    assert isinstance(outcome, Outcome)
    assert outcome.attempts == 2
    assert str(outcome.error) == "2"


def test_lost_tasks_are_sent_again_without_counting_an_attempt() -> None:
    clock = Clock()
    sched = make(batch=3, collect=True, clock=clock)
    (batch,) = sched.take(list("abc"))
    # the worker died on position 1: 0 and 2 are lost, not failed
    sched.complete(Done(batch, [None] * 3, {1: Failure(error=OSError("died"))}, lost=[0, 2]))
    (again,) = sched.due(clock.now)
    assert list(again.indices) == [0, 2]
    sched.complete(ok(again))
    outcomes = flatten(sched.pop_ready())
    assert [(o.index, o.ok, o.attempts) for o in outcomes] == [
        (0, True, 1),
        (1, False, 1),
        (2, True, 1),
    ]


def test_split_sends_each_lost_task_alone() -> None:
    clock = Clock()
    sched = make(batch=3, clock=clock)
    (batch,) = sched.take(list("abc"))
    sched.complete(Done(batch, [None] * 3, lost=[0, 1, 2], split=True))
    again = sched.due(clock.now)
    assert [list(b.indices) for b in again] == [[0], [1], [2]]


def test_sizer_grows_for_trivial_tasks_and_is_capped_by_the_input() -> None:
    growth = BatchSizer.GROWTH
    sizer = BatchSizer(None, adaptive=True, workers=2, total=100_000)
    assert sizer.size == 1
    sizer.observe(1, 1e-6)
    assert sizer.size == growth  # growth from one sample is limited
    sizer.observe(growth, growth * 1e-6)
    assert sizer.size == growth**2
    for _ in range(5):
        sizer.observe(sizer.size, sizer.size * 1e-6)
    assert sizer.size == 12_500  # 100,000 / (4 × 2): every worker stays busy to the end


def test_a_small_sample_does_not_shrink_batches_of_fast_tasks() -> None:
    sizer = BatchSizer(None, adaptive=True, workers=2, total=None, start=4096)
    sizer.observe(3, 3e-6)  # the last, partial batch of a run: fast, but only 3 tasks
    assert sizer.size == 4096


def test_sizer_keeps_long_tasks_single_and_shrinks() -> None:
    growth = BatchSizer.GROWTH
    sizer = BatchSizer(None, adaptive=True, workers=2, total=None)
    sizer.observe(1, 0.25)
    assert sizer.size == 1
    sizer.observe(1, 1e-5)
    assert sizer.size == growth
    sizer.observe(growth, growth * 0.01)  # the tasks got slower: 2 per 20 ms batch
    assert sizer.size == 2


def test_a_pool_remembers_the_batch_size_between_runs() -> None:
    sizer = BatchSizer(None, adaptive=True, workers=2, total=1000, start=4096)
    assert sizer.size == 125  # the start is still capped by this run's input


def test_a_report_without_a_measurement_changes_nothing() -> None:
    """A batch cut short by a dead worker or a timeout reports no busy time."""
    sizer = BatchSizer(None, adaptive=True, workers=2, total=None)
    sizer.observe(1, 0.0)
    assert sizer.size == 1


def test_fixed_batch_never_changes() -> None:
    sizer = BatchSizer(5, adaptive=True, workers=2, total=None)
    sizer.observe(5, 1e-9)
    assert sizer.size == 5


def test_lost_bookkeeping_fails_loudly_instead_of_hanging() -> None:
    """If the scheduler ever held tasks with nothing running or due to hand them back, the
    driver must raise rather than wait forever (white-box: the state is forced)."""
    import escala
    from escala._core.drive import _check_progress

    sched = make()
    sched.take(["a"])
    _check_progress(sched, None)  # one batch in flight: fine
    sched._in_flight = 0
    with pytest.raises(escala.EscalaError, match="lost track of 1 task"):
        _check_progress(sched, None)
    _check_progress(sched, due=123.0)  # a retry is due later: fine
