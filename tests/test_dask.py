"""Dask mode's own promises, on a real Dask cluster (the session's, or one started here)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import pytest

import escala
from escala._auto import run_auto
from escala._core.plan import collect
from escala._options import Options
from escala.advisor import _cluster
from escala.advisor._explain import human_time

distributed = pytest.importorskip("distributed")


def square(x: int) -> int:
    return x * x


def sigkill_on_two(x: int) -> int:
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    if x == 3:
        raise ValueError("an application error")
    return x


class Big:
    """A large shared argument that counts how often the caller pickles it."""

    pickled = 0

    def __init__(self) -> None:
        self.data = b"x" * 1_000_000

    def __reduce__(self) -> tuple[Any, ...]:
        Big.pickled += 1
        return (_rebuild_big, (self.data,))


def _rebuild_big(data: bytes) -> Big:
    big = Big.__new__(Big)
    big.data = data
    return big


def measure(big: Big, x: int) -> int:
    return len(big.data) + x


def test_an_address_runs_on_that_cluster_and_leaves_it_running(dask_cluster: Any) -> None:
    address = dask_cluster.scheduler.address
    assert escala.map(square, range(20), mode="dask", address=address) == [x * x for x in range(20)]
    with escala.Pool("dask", address=address) as pool:
        assert pool.workers == 2
        assert pool.submit(square, 3).result(timeout=30) == 9
    # the cluster is still there, with its workers
    assert dask_cluster.submit(square, 4, pure=False).result(timeout=30) == 16
    assert len(dask_cluster.scheduler_info()["workers"]) == 2


def test_without_an_address_a_local_cluster_is_started_and_stopped() -> None:
    with pytest.raises(ValueError, match="No clients found"):
        distributed.Client.current(allow_global=True)  # no client to reuse here
    assert escala.map(square, range(10), mode="dask", workers=2) == [x * x for x in range(10)]
    # nothing_left_behind fails the test if a worker process or thread survives


def test_a_large_shared_argument_is_sent_once(dask_cluster: Any) -> None:
    Big.pickled = 0
    task = partial(measure, Big())
    with dask_cluster.as_current():
        got = escala.map(task, range(40), mode="dask", batch=1)
    assert got == [1_000_000 + x for x in range(40)]
    assert Big.pickled == 1  # 40 Dask tasks, one copy scattered


def test_a_missing_engine_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "import escala\n"
        "try:\n"
        "    escala.map(abs, [1], mode='dask')\n"
        "except escala.EngineMissing as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'escala[dask]'" in out.stdout


def test_address_needs_a_cluster_mode() -> None:
    with pytest.raises(ValueError, match="mode='dask'"):
        escala.map(abs, [1], mode="threads", address="tcp://127.0.0.1:1")


def test_an_unreachable_scheduler_is_reported_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("escala.backends.dask.CONNECT_TIMEOUT", 1)
    with pytest.raises(escala.EscalaError, match="could not reach the Dask scheduler"):
        escala.map(abs, [1], mode="dask", address="tcp://127.0.0.1:1")
    # nothing_left_behind fails the test if the client's event loop thread survives


def test_a_killed_worker_is_not_an_application_error(dask_cluster: Any) -> None:
    with dask_cluster.as_current():
        outcomes = escala.map(sigkill_on_two, range(6), mode="dask", errors="collect")
    assert [o.ok for o in outcomes] == [x not in (2, 3) for x in range(6)]
    died = outcomes[2].error
    assert isinstance(died, escala.WorkerDied)
    assert died.index == 2
    assert "task #2" in str(died)
    assert "Dask worker tcp://127.0.0.1:" in str(died)
    assert isinstance(outcomes[3].error, ValueError)
    # the nannies replaced the dead workers
    dask_cluster.wait_for_workers(2, timeout=30)


def test_a_worker_death_can_be_retried(dask_cluster: Any, tmp_path: pathlib.Path) -> None:
    def die_twice(x: int) -> int:
        if x == 1:
            deaths = len(list(tmp_path.iterdir()))
            if deaths < 2:  # Dask runs it again once itself, then gives up
                (tmp_path / str(deaths)).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return x * 2

    retry = escala.Retry(attempts=1, on=(escala.WorkerDied,), backoff=0)
    with dask_cluster.as_current():
        outcomes = escala.map(die_twice, range(3), mode="dask", retries=retry, errors="collect")
    assert [o.value for o in outcomes] == [0, 2, 4]
    assert outcomes[1].attempts == 2
    dask_cluster.wait_for_workers(2, timeout=30)


def test_a_timeout_stops_the_task_by_restarting_its_worker(dask_cluster: Any) -> None:
    def hang(x: int) -> int:
        if x == 1:
            time.sleep(3600)
        return x

    with dask_cluster.as_current():
        outcomes = escala.map(hang, range(4), mode="dask", timeout=0.5, errors="collect")
    assert [o.ok for o in outcomes] == [True, False, True, True]
    error = outcomes[1].error
    assert isinstance(error, escala.TaskTimeout)
    assert error.stopped is True
    assert "was killed" in str(error)
    dask_cluster.wait_for_workers(2, timeout=30)
    with dask_cluster.as_current():
        assert escala.map(square, range(4), mode="dask") == [0, 1, 4, 9]


# -- mode="auto" with address= -------------------------------------------------------------


def inc(x: int) -> int:
    return x + 1


def spin_10ms(x: int) -> tuple[int, str]:
    """Compute for about 10 ms; say where: a Dask worker's address, or "here"."""
    total = 0
    for i in range(250_000):
        total += i
    try:
        where = distributed.get_worker().address
    except ValueError:
        where = "here"
    return x * x, where


@pytest.fixture
def fresh_figures() -> Iterator[None]:
    """No cluster figures measured by an earlier test: this one measures its own."""
    _cluster.forget()
    yield
    _cluster.forget()


def test_auto_weighs_the_cluster_and_keeps_trivial_tasks_here(
    dask_cluster: Any, fresh_figures: None
) -> None:
    address = dask_cluster.scheduler.address
    advice = escala.advise(inc, range(20_000), address=address)
    # the whole job takes milliseconds here: less than reaching any cluster costs
    assert advice.mode != "dask"
    figures = advice.cluster
    assert figures is not None and figures.reached
    assert (figures.engine, figures.address) == ("dask", address)
    # 2 workers of a thread each; 1 while a nanny restarts one that an earlier test killed
    assert figures.cores in (1, 2)
    assert figures.overhead > 0 and figures.start > 0
    text = advice.explain()
    threads = "1 worker thread" if figures.cores == 1 else "2 worker threads"
    assert (
        f"The Dask cluster at {address} has {threads} but costs "
        f"{human_time(figures.overhead)} per task handed to it" in text
    )
    assert f"so {advice.mode} was chosen here." in text
    # the figures are kept: this run does not connect to weigh the cluster again
    assert escala.map(inc, range(20_000), address=address) == [x + 1 for x in range(20_000)]


def test_auto_runs_on_the_cluster_when_it_pays(
    dask_cluster: Any, fresh_figures: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's cluster is measured for real, then taken for one of 64 workers that
    costs a millisecond a task: the same machine's cores could never pay for a cluster."""
    measured = _cluster.reach

    def bigger(*args: Any, **kwargs: Any) -> Any:
        backend, figures = measured(*args, **kwargs)
        return backend, replace(figures, cores=64, overhead=1e-3, start=0.01)

    monkeypatch.setattr(_cluster, "reach", bigger)
    chosen: list[escala.Advice] = []
    opts = Options(mode="auto", address=dask_cluster.scheduler.address)
    got = collect(run_auto(spin_10ms, range(24), opts, ordered=False, on_advice=chosen.append))
    assert [value for value, _ in got] == [x * x for x in range(24)]
    assert chosen[0].mode == "dask", chosen[0].explain()
    assert "The cluster was chosen" in chosen[0].explain()
    sampled = chosen[0].measured.samples if chosen[0].measured else 0
    assert {where for _, where in got[:sampled]} == {"here"}  # measured on a thread here
    assert all(where.startswith("tcp://127.0.0.1:") for _, where in got[sampled:])  # there


def test_auto_reports_a_scheduler_it_cannot_reach(
    fresh_figures: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("escala.backends.dask.CONNECT_TIMEOUT", 1)
    with pytest.raises(escala.EscalaError, match="could not reach the Dask scheduler"):
        escala.map(inc, range(1000), address="tcp://127.0.0.1:1")
