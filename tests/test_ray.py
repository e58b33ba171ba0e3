"""Ray mode's own promises, on a real local Ray (the session's, or one started here)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

import escala
from escala._auto import run_auto
from escala._core.plan import collect
from escala._options import Options
from escala.advisor import Cluster, _cluster
from escala.advisor._explain import human_time

ray = pytest.importorskip("ray")


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


def test_an_address_runs_on_that_cluster_and_leaves_it_running(ray_cluster: str) -> None:
    assert escala.map(square, range(20), mode="ray", address=ray_cluster) == [
        x * x for x in range(20)
    ]
    with escala.Pool("ray", address=ray_cluster) as pool:
        assert pool.workers == 2
        assert pool.submit(square, 3).result(timeout=30) == 9
    # the cluster is still there, and this process still connected to it
    assert ray.is_initialized()
    assert ray.get(ray.remote(square).remote(4), timeout=30) == 16


def test_another_address_than_the_current_cluster_is_refused(ray_cluster: str) -> None:
    with pytest.raises(escala.EscalaError, match="already connected"):
        escala.map(square, [1], mode="ray", address="127.0.0.1:1")


def test_without_an_address_a_local_cluster_is_started_and_stopped() -> None:
    # Ray allows one connection per process, and this one may hold the session's: the
    # local cluster is started (and must be gone) in a fresh interpreter
    code = textwrap.dedent(
        """
        import time, psutil, ray, escala
        assert not ray.is_initialized()
        got = escala.map(abs, range(-5, 5), mode="ray", workers=2)
        assert got == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4], got
        assert not ray.is_initialized()
        # two pools share the Ray escala started; the last one out shuts it down
        first = escala.Pool("ray", workers=2)
        second = escala.Pool("ray", workers=2)
        assert first.submit(abs, -1).result(timeout=60) == 1
        assert second.submit(abs, -2).result(timeout=60) == 2
        first.close()
        assert second.submit(abs, -3).result(timeout=60) == 3
        second.close()
        assert not ray.is_initialized()
        deadline = time.monotonic() + 15
        while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [" ".join(p.cmdline()[:2]) for p in psutil.Process().children(recursive=True)]
        print("left:", left)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "left: []" in out.stdout, out.stdout + out.stderr


def test_a_large_shared_argument_is_sent_once(ray_cluster: str) -> None:
    Big.pickled = 0
    task = partial(measure, Big())
    got = escala.map(task, range(40), mode="ray", batch=1)
    assert got == [1_000_000 + x for x in range(40)]
    assert Big.pickled == 1  # 40 Ray tasks, one copy put in the object store


def test_a_missing_engine_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import escala\n"
        "try:\n"
        "    escala.map(abs, [1], mode='ray')\n"
        "except escala.EngineMissing as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'escala[ray]'" in out.stdout


def test_a_killed_worker_is_not_an_application_error(ray_cluster: str) -> None:
    outcomes = escala.map(sigkill_on_two, range(6), mode="ray", errors="collect")
    assert [o.ok for o in outcomes] == [x not in (2, 3) for x in range(6)]
    died = outcomes[2].error
    assert isinstance(died, escala.WorkerDied)
    assert died.index == 2
    assert "task #2" in str(died)
    assert "Ray worker" in str(died)
    assert isinstance(died.__cause__, ray.exceptions.WorkerCrashedError)
    assert isinstance(outcomes[3].error, ValueError)
    assert isinstance(outcomes[3].error.__cause__, escala.RemoteTraceback)
    assert "in sigkill_on_two" in outcomes[3].error.__cause__.tb


def test_a_worker_death_can_be_retried(ray_cluster: str, tmp_path: pathlib.Path) -> None:
    def die_once(x: int) -> int:
        if x == 1 and not list(tmp_path.iterdir()):
            (tmp_path / "died").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 2

    retry = escala.Retry(attempts=1, on=(escala.WorkerDied,), backoff=0)
    outcomes = escala.map(die_once, range(3), mode="ray", retries=retry, errors="collect")
    assert [o.value for o in outcomes] == [0, 2, 4]
    assert outcomes[1].attempts == 2


def test_a_timeout_stops_the_task_by_killing_its_worker(
    ray_cluster: str, tmp_path: pathlib.Path
) -> None:
    def hang(x: int) -> int:
        if x == 1:
            (tmp_path / "pid").write_text(str(os.getpid()))
            time.sleep(3600)
        return x

    outcomes = escala.map(hang, range(4), mode="ray", timeout=1, errors="collect")
    assert [o.ok for o in outcomes] == [True, False, True, True]
    error = outcomes[1].error
    assert isinstance(error, escala.TaskTimeout)
    assert error.stopped is True
    assert "was killed" in str(error)
    # the worker that ran it is gone
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    assert escala.map(square, range(4), mode="ray") == [0, 1, 4, 9]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- mode="auto" with address= -------------------------------------------------------------


def inc(x: int) -> int:
    return x + 1


def spin_10ms(x: int) -> tuple[int, bool]:
    """Compute for about 10 ms; say whether this ran in a Ray worker."""
    total = 0
    for i in range(250_000):
        total += i
    return x * x, ray.get_runtime_context().worker.mode == ray.WORKER_MODE


@pytest.fixture
def fresh_figures() -> Iterator[None]:
    """No cluster figures measured by an earlier test: this one measures its own."""
    _cluster.forget()
    yield
    _cluster.forget()


def test_auto_weighs_the_cluster_and_keeps_trivial_tasks_here(
    ray_cluster: str, fresh_figures: None
) -> None:
    advice = escala.advise(inc, range(20_000), address=ray_cluster)
    # the whole job takes milliseconds here: less than reaching any cluster costs
    assert advice.mode != "ray"
    figures = advice.cluster
    assert figures is not None and figures.reached
    assert (figures.engine, figures.address, figures.cores) == ("ray", ray_cluster, 2)
    assert figures.overhead > 0 and figures.start > 0
    text = advice.explain()
    assert (
        f"The Ray cluster at {ray_cluster} has 2 CPUs but costs "
        f"{human_time(figures.overhead)} per task handed to it" in text
    )
    assert f"so {advice.mode} was chosen here." in text
    assert escala.map(inc, range(20_000), address=ray_cluster) == [x + 1 for x in range(20_000)]
    assert ray.is_initialized()  # the session's connection, still there


def test_auto_runs_on_the_cluster_when_its_figures_pay(
    ray_cluster: str, fresh_figures: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Figures of a cluster of 64 CPUs at a millisecond a task, as if measured a moment ago:
    the run connects to the session's Ray only to run there."""
    figures = Cluster("ray", ray_cluster, cores=64, overhead=1e-3, start=0.01)
    monkeypatch.setitem(_cluster._cache, ("ray", ray_cluster, None), (time.monotonic(), figures))
    chosen: list[escala.Advice] = []
    opts = Options(mode="auto", address=ray_cluster)
    got = collect(run_auto(spin_10ms, range(24), opts, ordered=False, on_advice=chosen.append))
    assert [value for value, _ in got] == [x * x for x in range(24)]
    assert chosen[0].mode == "ray", chosen[0].explain()
    assert "has 64 CPUs and costs 1.0 ms per task" in chosen[0].explain()
    sampled = chosen[0].measured.samples if chosen[0].measured else 0
    assert all(in_ray for _, in_ray in got[sampled:])  # all but the sampled: there
    assert not any(in_ray for _, in_ray in got[:sampled])


def test_auto_refuses_another_ray_cluster_than_the_current_one(
    ray_cluster: str, fresh_figures: None
) -> None:
    with pytest.raises(escala.EscalaError, match="already connected"):
        escala.map(inc, range(1000), address="127.0.0.1:1")
