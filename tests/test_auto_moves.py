"""mode="auto" verifies its choice while running and moves the rest when it falls short.

Two halves. The controller (:mod:`escala.advisor._verify`) is tested with synthetic
figures and a fake clock: a mode below its promise triggers a trial, one that meets it does
not. The moves themselves run for real (threads, worker processes, sequential) with the
judge scripted, so that each test moves at a known point whatever the machine's speed:
no item runs twice, order, outcomes, retries, timeouts and Ctrl-C hold across a move.
"""

from __future__ import annotations

import functools
import itertools
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from typing import Any

import psutil
import pytest

import escala
from escala.advisor import Advice, Measurements, _verify
from escala.advisor._decide import alternatives

# -- the controller, with synthetic figures -----------------------------------------------


def leg(mode: str, predicted: float, measured: float | None, workers: int = 2) -> _verify.Leg:
    return _verify.Leg(mode, workers, predicted, measured, tasks=40, seconds=0.2)


PROMISES = {"sequential": (1, 1.0), "threads": (2, 1.9), "processes": (2, 1.8)}
LOTS = 60.0  # seconds of sequential work left: any trial pays


def test_a_mode_that_delivers_its_promise_stays() -> None:
    assert _verify.judge([leg("threads", 1.9, 1.7)], PROMISES, LOTS, {"processes": 0.05}) == (
        "threads"
    )


def test_a_mode_far_below_its_promise_tries_the_runner_up() -> None:
    legs = [leg("threads", 1.9, 0.7)]
    assert _verify.judge(legs, PROMISES, LOTS, {"processes": 0.05}) == "processes"


def test_a_trial_must_pay_for_its_start_on_the_work_left() -> None:
    legs = [leg("threads", 1.9, 0.95)]
    # 0.3 s of work left saves 0.3 × (1/0.95 − 1/1.8) ≈ 0.15 s: not 3 × a 0.1 s start
    assert _verify.judge(legs, PROMISES, 0.3, {"processes": 0.1}) == "threads"
    assert _verify.judge(legs, PROMISES, LOTS, {"processes": 0.1}) == "processes"


def test_no_trial_where_the_input_would_end_before_it_is_measured() -> None:
    legs = [leg("threads", 1.9, 1.0)]
    # 0.17 s of work left, tasks of 58 ms: a trial would end before 5 rounds of it ran
    assert _verify.judge(legs, PROMISES, 0.17, {}, round_time=0.058) == "threads"
    assert _verify.judge(legs, PROMISES, LOTS, {}, round_time=0.058) == "processes"


def test_a_mode_slower_than_sequential_with_nothing_to_try_moves_to_sequential() -> None:
    promises = {"sequential": (1, 1.0), "threads": (8, 3.0)}  # processes impossible
    assert _verify.judge([leg("threads", 3.0, 0.6)], promises, LOTS, {}) == "sequential"


def test_a_small_shortfall_is_noise_not_a_move() -> None:
    promises = {"sequential": (1, 1.0), "threads": (8, 3.0)}
    assert _verify.judge([leg("threads", 3.0, 0.95)], promises, LOTS, {}) == "threads"


def test_a_trial_that_did_worse_moves_back() -> None:
    legs = [leg("threads", 1.9, 0.9), leg("processes", 1.8, 0.6)]
    assert _verify.judge(legs, PROMISES, LOTS, {"processes": 0.0}) == "sequential"
    legs = [leg("threads", 1.9, 1.3), leg("processes", 1.8, 0.8)]
    assert _verify.judge(legs, PROMISES, LOTS, {"processes": 0.0}) == "threads"


def test_a_trial_that_did_better_stays() -> None:
    legs = [leg("threads", 1.9, 0.9), leg("processes", 1.8, 1.7)]
    assert _verify.judge(legs, PROMISES, LOTS, {}) == "processes"


def test_a_mode_that_met_a_low_promise_still_tries_a_much_higher_one() -> None:
    # chosen from a first task seen only computing; finished, it turned out to wait
    promises = {"sequential": (1, 1.0), "threads": (8, 4.3), "processes": (2, 2.0)}
    assert _verify.judge([leg("processes", 2.0, 1.95)], promises, LOTS, {}) == "threads"


def test_figures_completed_after_the_decision_can_move_the_rest_at_once() -> None:
    promises = {"sequential": (1, 1.0), "threads": (8, 4.3), "processes": (2, 2.0)}
    assert _verify.redecide("processes", promises, LOTS, {}) == "threads"
    assert _verify.redecide("threads", promises, LOTS, {"processes": 0.05}) == "threads"
    close = {"sequential": (1, 1.0), "threads": (2, 2.1), "processes": (2, 1.9)}
    assert _verify.redecide("processes", close, LOTS, {}) == "processes"


def test_the_meter_waits_for_its_span_and_counts_from_its_first_look() -> None:
    meter = _verify.Meter(per_task=0.01, round_time=0.01)  # span: max(0.1, 5 × 0.01)
    assert meter.observe(3, now=0.0) is None  # the start
    assert meter.observe(10, now=0.05) is None  # too soon
    speedup, tasks, seconds = meter.observe(23, now=0.1) or (0.0, 0, 0.0)
    assert tasks == 20 and seconds == pytest.approx(0.1)
    assert speedup == pytest.approx(2.0)  # 20 tasks of 10 ms in 0.1 s


def test_the_meter_waits_several_rounds_of_long_tasks() -> None:
    meter = _verify.Meter(per_task=0.2, round_time=0.2)
    meter.observe(0, now=0.0)
    assert meter.observe(4, now=0.4) is None  # 2 rounds of 5
    assert meter.observe(10, now=1.0) is not None


def test_the_meter_starts_again_when_told() -> None:
    meter = _verify.Meter(per_task=0.01, round_time=0.0)
    meter.observe(0, now=0.0)
    meter.restart()
    assert meter.observe(50, now=0.25) is None  # a new start, not 50 tasks in 0.25 s
    assert meter.observe(60, now=0.5) == pytest.approx((0.4, 10, 0.25))


def test_the_meter_gives_a_glimpse_halfway_and_a_verdict_at_the_end() -> None:
    meter = _verify.Meter(per_task=0.01, round_time=0.01)  # span 0.1 s
    assert meter.glimpse(5, now=0.0) is None  # nothing observed yet
    meter.observe(0, now=0.0)
    assert meter.glimpse(3, now=0.04) is None  # under half the span
    assert meter.glimpse(5, now=0.05) == pytest.approx(1.0)  # 5 tasks of 10 ms in 50 ms
    assert meter.observe(5, now=0.05) is None  # a glimpse is no verdict
    assert meter.observe(20, now=0.1) == pytest.approx((2.0, 20, 0.1))


def figures(**changes: Any) -> Measurements:
    base = {
        "samples": 4,
        "lower_bound": False,
        "wall": 0.05,
        "cpu": 0.012,
        "queued": 0.0,
        "gil_held": True,
        "gil_wait": 0.005,
        "free_threaded": False,
        "arg_bytes": 30,
        "result_bytes": 30,
        "picklable": True,
        "total": 1000,
        "cores": 2,
        "overhead": {"threads-task": 5e-5, "processes-start": 0.04, "processes-task": 1e-4},
    }
    return Measurements(**{**base, **changes})


def test_the_promises_of_work_that_waits_favour_threads() -> None:
    promises = alternatives(figures(), 1000)
    assert promises["threads"][1] > 2 * promises["processes"][1]
    assert promises["threads"][1] == pytest.approx(0.05 / 0.012, rel=0.05)  # GIL-bound


def test_the_promises_of_computing_python_favour_processes() -> None:
    promises = alternatives(figures(wall=0.01, cpu=0.01), 1000)
    assert promises["threads"][1] == pytest.approx(1.0, rel=0.05)
    assert promises["processes"][1] > 1.8


def test_no_promise_of_processes_for_what_cannot_be_pickled() -> None:
    assert "processes" not in alternatives(figures(picklable=False), 1000)


# -- real moves, at scripted points --------------------------------------------------------


def mark(folder: str, x: int) -> int:
    """A task that leaves one file per run: a second run of the same item fails."""
    fd = os.open(os.path.join(folder, str(x)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(0.003)  # waits: auto starts in threads
    return x * x


def pids_of(folder: pathlib.Path) -> set[int]:
    return {int(p.read_text()) for p in folder.iterdir() if p.read_text()}


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Judge at the first completion after the start, moving as the test's list says."""
    script: list[str] = []

    def judge(legs: list[_verify.Leg], *_: Any, **__: Any) -> str:
        return script.pop(0) if script else legs[-1].mode

    monkeypatch.setattr(_verify, "judge", judge)
    monkeypatch.setattr(_verify, "SPAN", 0.0)
    monkeypatch.setattr(_verify, "ROUNDS", 0)
    return script


MOVES = {
    "threads-processes": ["processes"],
    "threads-sequential": ["sequential"],
    "threads-processes-threads": ["processes", "threads"],
}


def ran(runs: list[Advice]) -> list[str]:
    return [leg.mode for leg in runs[-1].legs]


@pytest.mark.parametrize("moves", list(MOVES), ids=list(MOVES))
def test_a_move_runs_every_item_once_in_order(
    scripted: list[str], moves: str, tmp_path: pathlib.Path
) -> None:
    scripted.extend(MOVES[moves])
    task = functools.partial(mark, str(tmp_path))
    with escala.advisor.recording() as runs:
        results = escala.map(task, range(300))
    assert results == [x * x for x in range(300)]
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == list(range(300))
    assert "-".join(ran(runs)) == moves
    legs = runs[-1].legs
    assert all(a.first < b.first for a, b in itertools.pairwise(legs))
    if "processes" in moves:
        assert len(pids_of(tmp_path)) > 1  # the worker processes ran some


@pytest.mark.parametrize("moves", list(MOVES), ids=list(MOVES))
def test_imap_streams_in_order_across_moves(
    scripted: list[str], moves: str, tmp_path: pathlib.Path
) -> None:
    scripted.extend(MOVES[moves])
    task = functools.partial(mark, str(tmp_path))
    with escala.advisor.recording() as runs:
        assert list(escala.imap(task, iter(range(200)))) == [x * x for x in range(200)]
    assert "-".join(ran(runs)) == moves
    assert len(list(tmp_path.iterdir())) == 200


def fails_on_sevens(folder: str, x: int) -> int:
    mark(folder, x)
    if x % 7 == 0:
        raise ValueError(f"bad {x}")
    return x


@pytest.mark.parametrize("moves", list(MOVES), ids=list(MOVES))
def test_collected_outcomes_name_positions_in_the_whole_input(
    scripted: list[str], moves: str, tmp_path: pathlib.Path
) -> None:
    scripted.extend(MOVES[moves])
    task = functools.partial(fails_on_sevens, str(tmp_path))
    with escala.advisor.recording() as runs:
        outcomes = escala.map(task, range(250), errors="collect")
    assert "-".join(ran(runs)) == moves
    assert [o.index for o in outcomes] == list(range(250))
    assert [o.item for o in outcomes] == list(range(250))
    for o in outcomes:
        if o.index % 7 == 0:
            assert isinstance(o.error, ValueError) and str(o.error) == f"bad {o.index}"
        else:
            assert o.value == o.index and o.attempts == 1


def flaky_once(folder: str, x: int) -> int:
    """Fails on its first run for items divisible by 5, succeeds on the retry."""
    path = os.path.join(folder, f"{x}.try")
    if x % 5 == 0 and not os.path.exists(path):
        open(path, "w").close()
        raise ConnectionError(f"first try of {x}")
    return mark(folder, x)


@pytest.mark.parametrize("moves", list(MOVES), ids=list(MOVES))
def test_retries_keep_their_meaning_across_moves(
    scripted: list[str], moves: str, tmp_path: pathlib.Path
) -> None:
    scripted.extend(MOVES[moves])
    task = functools.partial(flaky_once, str(tmp_path))
    retry = escala.Retry(attempts=2, on=(ConnectionError,), backoff=0.0)
    with escala.advisor.recording() as runs:
        outcomes = escala.map(task, range(200), retries=retry, errors="collect")
    assert "-".join(ran(runs)) == moves
    assert all(o.ok for o in outcomes)
    assert [o.attempts for o in outcomes] == [2 if i % 5 == 0 else 1 for i in range(200)]


def slow_at(folder: str, slow: int, x: int) -> int:
    if x == slow:
        time.sleep(5)
    return mark(folder, x)


def test_a_timeout_holds_after_a_move(scripted: list[str], tmp_path: pathlib.Path) -> None:
    scripted.append("processes")
    task = functools.partial(slow_at, str(tmp_path), 250)
    with escala.advisor.recording() as runs:
        # batch=1: a killed worker's batch-mates would run again (the README says so)
        outcomes = escala.map(task, range(300), timeout=0.5, errors="collect", batch=1)
    assert ran(runs) == ["threads", "processes"]
    assert runs[-1].legs[1].first < 250  # the slow item ran after the move
    (late,) = [o for o in outcomes if not o.ok]
    assert late.index == 250 and isinstance(late.error, escala.TaskTimeout)
    assert all(o.value == o.index**2 for o in outcomes if o.ok)


MOVING = textwrap.dedent(
    r"""
    import os, sys, time
    import escala
    from escala.advisor import _verify

    _verify.SPAN, _verify.ROUNDS = 0.0, 0
    script = ["processes"]
    _verify.judge = lambda legs, *a, **k: script.pop(0) if script else legs[-1].mode

    def task(x):
        os.write(1, b"%d\n" % os.getpid())  # one write: lines from threads never mix
        time.sleep(0.005)
        return x

    os.write(1, b"%d\n" % os.getpid())
    escala.map(task, range(100_000))
    """
)


def test_ctrl_c_after_a_move_leaves_no_process_or_thread(tmp_path: pathlib.Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", MOVING],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert child.stdout is not None
        parent = int(child.stdout.readline())
        workers: set[int] = set()
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, "the child ended before it moved to processes"
            if int(line) != parent:
                workers.add(int(line))  # a worker process runs tasks: the move happened
        assert workers, "no task ran in a worker process"
        descendants = {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    for pid in descendants | workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_an_item_slow_to_pickle_keeps_the_work_out_of_processes() -> None:
    """A list of 100,000 ints is 370 KB but takes ~6 ms to pickle and unpickle: measured,
    not guessed from its size, that cost outweighs the 5 ms task on two cores."""
    from escala.advisor._decide import decide

    computing = figures(wall=0.005, cpu=0.005, arg_bytes=370_000, send_time=None)
    assert decide(computing, 1000).mode == "processes"
    assert decide(replace(computing, send_time=0.0065), 1000).mode == "sequential"
