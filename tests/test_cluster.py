"""What both cluster engines promise, each test run on Dask and on Ray.

``cluster`` is the session's real cluster of one engine (conftest's ``dask_cluster``, a
LocalCluster of two single-threaded workers, or ``ray_cluster``, a local Ray of two CPUs)
behind the few things a test does with it. What differs between the engines as the tests
see it (how an error names a worker, how often a task whose worker died is run again) is
written once, in ``ENGINES``. A check that needs a cluster of its own, or none, runs in a
fresh interpreter: Ray allows one connection per process, and this one may hold the
session's. What only one engine promises stays in test_dask.py or test_ray.py; a known gap
of one engine is a strict xfail on that engine alone (``xfail_on``).
"""

from __future__ import annotations

import abc
import collections
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import psutil
import pytest

import escala
from conftest import ensure_dask_workers
from escala._auto import run_auto
from escala._core.plan import collect
from escala._options import Options
from escala.advisor import Cluster, _cluster
from escala.advisor._explain import human_time

# The engines are optional: the tests of one that is not installed skip (see ``engine``).
try:
    import distributed
except ImportError:
    distributed = None
try:
    import ray
except ImportError:
    ray = None


@dataclass(frozen=True)
class Engine:
    """What differs between the two engines, as these tests see it."""

    mode: str  # escala's mode, and the engine's name in advice
    module: str  # the package that is the engine
    title: str  # its name in escala's messages
    unit: str  # what advice counts the cluster's cores in
    worker: str  # how an error names one of its workers
    nowhere: str  # an address of the engine's form where nothing answers
    unreachable: str  # how escala's error for that address begins
    connected: str  # an expression true while this process is connected to a cluster
    tries: int  # workers a task that kills its worker runs on before escala hears of it
    cores: tuple[int, ...]  # what advice may count of the session's cluster


ENGINES = {
    "dask": Engine(
        mode="dask",
        module="distributed",
        title="Dask",
        unit="worker thread",
        worker="Dask worker tcp://127.0.0.1:",
        nowhere="tcp://127.0.0.1:1",
        unreachable="could not reach the Dask scheduler at",
        connected="distributed.Client.current(allow_global=True)",
        tries=2,  # the session's cluster allows one failure (allowed-failures=1)
        cores=(1, 2),  # 1 while a nanny restarts a worker that an earlier test killed
    ),
    "ray": Engine(
        mode="ray",
        module="ray",
        title="Ray",
        unit="CPU",
        worker="Ray worker",
        nowhere="127.0.0.1:1",
        unreachable="could not reach the Ray cluster at",
        connected="ray.is_initialized()",
        tries=1,  # escala's Ray tasks are never retried by Ray itself (max_retries=0)
        cores=(2,),
    ),
}


class SessionCluster(abc.ABC):
    """The session's cluster of one engine, behind what the tests do with it."""

    engine: Engine
    address: str
    crashed: type[BaseException]  # the engine's own error for a task whose worker died

    @property
    def mode(self) -> str:
        return self.engine.mode

    @abc.abstractmethod
    def connected(self) -> bool:
        """Return whether this process is still connected to the cluster."""

    @abc.abstractmethod
    def cores(self) -> int:
        """Return the tasks the cluster runs at once, as its engine counts them."""

    @abc.abstractmethod
    def run_there(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the cluster through the engine's own API; return its value."""

    @abc.abstractmethod
    def heal(self) -> None:
        """Wait until the cluster has a worker ready for each of its cores again."""

    @abc.abstractmethod
    def kill_workers(self) -> None:
        """Kill every worker of the cluster, through the engine's own API."""


class DaskSession(SessionCluster):
    """The session's Dask cluster, through the client ``dask_cluster`` connected."""

    def __init__(self, client: Any) -> None:
        self.engine = ENGINES["dask"]
        self.client = client
        self.address = client.scheduler.address
        self.crashed = distributed.KilledWorker

    def connected(self) -> bool:
        return bool(self.client.status == "running")

    def cores(self) -> int:
        workers = self.client.scheduler_info()["workers"].values()
        return sum(int(worker["nthreads"]) for worker in workers)

    def run_there(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False).result(timeout=30)

    def heal(self) -> None:
        ensure_dask_workers(self.client)  # the nannies replace dead workers

    def kill_workers(self) -> None:
        # restart() returns once the nannies have started new ones: a run that starts while
        # no worker is up fails in client.scatter ("No valid workers found") after 2 s
        self.client.restart()


class RaySession(SessionCluster):
    """The session's local Ray: this process's connection (``ray_cluster`` called ``ray.init``)."""

    def __init__(self, address: str) -> None:
        self.engine = ENGINES["ray"]
        self.address = address
        self.crashed = ray.exceptions.WorkerCrashedError

    def connected(self) -> bool:
        return bool(ray.is_initialized())

    def cores(self) -> int:
        return int(ray.cluster_resources()["CPU"])

    def run_there(self, fn: Callable[..., Any], *args: Any) -> Any:
        # ray.remote connects anew where this process is not connected: check connected() first
        return ray.get(ray.remote(fn).remote(*args), timeout=30)

    def heal(self) -> None:
        # the raylet starts a worker only when a task needs one, and escala's timeouts count
        # that start (test_a_timeout_counts_the_run_not_the_wait_for_a_worker): hold every
        # CPU at once, so that each has a worker again
        ray.get([ray.remote(hold).remote(0.5) for _ in range(self.cores())], timeout=60)

    def kill_workers(self) -> None:
        # one task per CPU at once, each killing its worker: the raylet starts no new one
        # until a task needs it
        die = ray.remote(max_retries=0)(sigkill)
        for ref in [die.remote(i) for i in range(self.cores())]:
            with pytest.raises(ray.exceptions.WorkerCrashedError):
                ray.get(ref, timeout=60)


@pytest.fixture(params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each test here runs once per cluster engine, with its name as the id; it skips where
    the engine is not installed."""
    found = ENGINES[request.param]
    pytest.importorskip(found.module, reason=f"escala[{found.mode}] is not installed")
    return found


@pytest.fixture
def cluster(engine: Engine, request: pytest.FixtureRequest) -> Iterator[SessionCluster]:
    """The session's cluster of ``engine``, set up as the ``mode`` fixture sets it up: the
    session's Dask client is the current one, so ``mode="dask"`` without an address runs
    there; the session's Ray is this process's connection."""
    if engine.mode == "dask":
        client = request.getfixturevalue("dask_cluster")
        with client.as_current():
            yield DaskSession(client)
    else:
        yield RaySession(request.getfixturevalue("ray_cluster"))


def xfail_on(mode: str, reason: str, **xfail: Any) -> pytest.MarkDecorator:
    """Run a test on both engines, and expect it to fail on ``mode``'s: a known gap."""
    marked = pytest.mark.xfail(strict=True, reason=reason, **xfail)
    params = [pytest.param(m, marks=marked) if m == mode else m for m in ENGINES]
    return pytest.mark.parametrize("engine", params, indirect=True)


# The script a fresh interpreter runs: ``connected()``, the test's lines, then a line that
# says which child processes and threads outlived them.
_FRESH = """
import threading, time
import psutil
import escala
import {module}

MODE, NOWHERE = {mode!r}, {nowhere!r}


def connected():
    try:
        return bool({connected})
    except ValueError:  # distributed.Client.current(): there is none
        return False


{body}

# what multiprocessing and distributed keep for the life of an interpreter, by design (as
# conftest's nothing_left_behind allows); a local cluster takes a moment to be gone
helpers = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
deadline = time.monotonic() + 15
while True:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if not any(helper in cmdline for helper in helpers):
            children.append(cmdline[:80])
    if not children or time.monotonic() > deadline:
        break
    time.sleep(0.1)
threads = sorted(
    t.name for t in threading.enumerate()
    if t is not threading.main_thread()
    and not t.name.startswith(("Dask-Callback-Thread", "Dask-Offload"))
)
print("left:", children, threads)
"""


def in_a_fresh_interpreter(engine: Engine, body: str, *, timeout: float) -> str:
    """Run ``body`` in a new interpreter, with ``MODE``, ``NOWHERE`` and ``connected()``
    of ``engine``; return what it printed, which ends with what it left behind.

    Raises:
        subprocess.TimeoutExpired: it ran past ``timeout`` seconds (it is killed).
    """
    code = _FRESH.format(
        module=engine.module,
        mode=engine.mode,
        nowhere=engine.nowhere,
        connected=engine.connected,
        body=textwrap.dedent(body).strip(),
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# -- tasks (module-level: the workers import them by name) --------------------------------


def square(x: int) -> int:
    return x * x


def inc(x: int) -> int:
    return x + 1


def sigkill_on_two(x: int) -> int:
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    if x == 3:
        raise ValueError("an application error")
    return x


def sigkill(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def hold(seconds: float) -> None:
    """Keep a core busy (see ``RaySession.heal``)."""
    time.sleep(seconds)


def spin_10ms(x: int) -> tuple[int, int]:
    """Compute for about 10 ms; say where, by the pid of the process it ran in."""
    total = 0
    for i in range(250_000):
        total += i
    return x * x, os.getpid()


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


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- where it runs -------------------------------------------------------------------------


def test_an_address_runs_on_that_cluster_and_leaves_it_running(cluster: SessionCluster) -> None:
    mode, address = cluster.mode, cluster.address
    assert escala.map(square, range(20), mode=mode, address=address) == [x * x for x in range(20)]
    with escala.Pool(mode, address=address) as pool:
        assert pool.workers == 2
        assert pool.submit(square, 3).result(timeout=30) == 9
    # the cluster is still there, with its workers, and this process still connected to it
    assert cluster.connected()
    assert cluster.cores() == 2
    assert cluster.run_there(square, 4) == 16


def test_without_an_address_a_local_cluster_is_started_and_stopped(engine: Engine) -> None:
    out = in_a_fresh_interpreter(
        engine,
        """
        assert not connected()
        got = escala.map(abs, range(-5, 5), mode=MODE, workers=2)
        assert got == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4], got
        assert not connected()
        # two pools at once: on Ray they share the Ray escala started, and the last one
        # out shuts it down; on Dask each has a local cluster of its own
        first = escala.Pool(MODE, workers=2)
        second = escala.Pool(MODE, workers=2)
        assert first.submit(abs, -1).result(timeout=60) == 1
        assert second.submit(abs, -2).result(timeout=60) == 2
        first.close()
        assert second.submit(abs, -3).result(timeout=60) == 3
        second.close()
        assert not connected()
        """,
        timeout=120,
    )
    assert out.endswith("left: [] []\n"), out


def test_a_large_shared_argument_is_sent_once(cluster: SessionCluster) -> None:
    Big.pickled = 0
    task = partial(measure, Big())
    got = escala.map(task, range(40), mode=cluster.mode, batch=1)
    assert got == [1_000_000 + x for x in range(40)]
    # 40 tasks, one copy: scattered (Dask), put in the object store (Ray)
    assert Big.pickled == 1


# -- refused, missing, unreachable ---------------------------------------------------------


def test_a_missing_engine_says_how_to_install_it(engine: Engine) -> None:
    code = (
        f"import sys; sys.modules[{engine.module!r}] = None\n"
        "import escala\n"
        "try:\n"
        f"    escala.map(abs, [1], mode={engine.mode!r})\n"
        "except escala.EngineMissing as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert f"pip install 'escala[{engine.mode}]'" in out.stdout


def test_an_address_needs_a_cluster_mode(engine: Engine) -> None:
    with pytest.raises(ValueError, match=f"mode='{engine.mode}'"):
        escala.map(abs, [1], mode="threads", address=engine.nowhere)


# escala's Ray backend connects with a bare ray.init(address=...), which goes on retrying an
# address where nothing answers (seen: still retrying after 5 minutes) and never reports it.
# a second to connect, not the engines' defaults
_UNREACHABLE = """
import escala.backends.{mode} as backend
backend.CONNECT_TIMEOUT = 1
try:
    {call}
except escala.EscalaError as exc:
    print("error:", exc)
assert not connected()
"""


def test_an_unreachable_cluster_is_reported_and_leaves_nothing_behind(engine: Engine) -> None:
    call = "escala.map(abs, [1], mode=MODE, address=NOWHERE)"
    out = in_a_fresh_interpreter(
        engine, _UNREACHABLE.format(mode=engine.mode, call=call), timeout=15
    )
    assert f"error: {engine.unreachable} {engine.nowhere!r}" in out, out
    assert out.endswith("left: [] []\n"), out


def test_auto_reports_a_cluster_it_cannot_reach(engine: Engine) -> None:
    call = "escala.map(abs, range(1000), address=NOWHERE)"
    out = in_a_fresh_interpreter(
        engine, _UNREACHABLE.format(mode=engine.mode, call=call), timeout=15
    )
    assert f"error: {engine.unreachable} {engine.nowhere!r}" in out, out
    assert out.endswith("left: [] []\n"), out


# -- tasks that fork ----------------------------------------------------------------------


def fork_on_one(folder: str, x: int) -> int:
    """Item 1 forks and both processes return; every call leaves a file after that."""
    if x == 1:
        os.fork()
    pathlib.Path(folder, f"{x}-{os.getpid()}").touch()
    return x


@pytest.mark.timeout(60)
def test_a_child_forked_by_a_task_ends_with_the_task(
    cluster: SessionCluster, tmp_path: pathlib.Path
) -> None:
    """One batch of four: a child that went on with the batch would run items 2 and 3 again."""
    task = partial(fork_on_one, str(tmp_path))
    assert escala.map(task, range(4), mode=cluster.mode, batch=4) == [0, 1, 2, 3]
    deadline = time.monotonic() + 20  # the child writes its file as it returns
    while len(list(tmp_path.glob("1-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # nothing to wait on: the child is the cluster worker's
    calls = collections.Counter(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert calls == {"0": 1, "1": 2, "2": 1, "3": 1}, calls


# -- workers that die or hang --------------------------------------------------------------


def test_a_killed_worker_is_not_an_application_error(cluster: SessionCluster) -> None:
    outcomes = escala.map(sigkill_on_two, range(6), mode=cluster.mode, errors="collect")
    assert [o.ok for o in outcomes] == [x not in (2, 3) for x in range(6)]
    died = outcomes[2].error
    assert isinstance(died, escala.WorkerDied)
    assert died.index == 2
    assert "task #2" in str(died)
    assert cluster.engine.worker in str(died)
    assert isinstance(died.__cause__, cluster.crashed)
    failed = outcomes[3].error
    assert isinstance(failed, ValueError)
    assert isinstance(failed.__cause__, escala.RemoteTraceback)
    assert "in sigkill_on_two" in failed.__cause__.tb
    cluster.heal()


def test_a_worker_death_can_be_retried(cluster: SessionCluster, tmp_path: pathlib.Path) -> None:
    tries = cluster.engine.tries

    def die_on_every_try(x: int) -> int:
        if x == 1:
            deaths = len(list(tmp_path.iterdir()))
            if deaths < tries:  # on each worker the engine runs it on, then never again
                (tmp_path / str(deaths)).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return x * 2

    retry = escala.Retry(attempts=1, on=(escala.WorkerDied,), backoff=0)
    outcomes = escala.map(
        die_on_every_try, range(3), mode=cluster.mode, retries=retry, errors="collect"
    )
    assert [o.value for o in outcomes] == [0, 2, 4]
    assert outcomes[1].attempts == 2
    cluster.heal()


def test_a_timeout_stops_the_task_by_killing_its_worker(
    cluster: SessionCluster, tmp_path: pathlib.Path
) -> None:
    def hang(x: int) -> int:
        if x == 1:
            (tmp_path / "pid").write_text(str(os.getpid()))
            time.sleep(3600)
        return x

    cluster.heal()  # a worker for each task: their clocks count runs, not worker starts
    outcomes = escala.map(hang, range(4), mode=cluster.mode, timeout=1, errors="collect")
    assert [o.ok for o in outcomes] == [True, False, True, True], [o.error for o in outcomes]
    error = outcomes[1].error
    assert isinstance(error, escala.TaskTimeout)
    assert error.stopped is True
    assert "was killed" in str(error)
    # the worker that ran it is gone (polled: it is another process's child, or Ray's)
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    cluster.heal()
    assert escala.map(square, range(4), mode=cluster.mode) == [0, 1, 4, 9]


@xfail_on(
    "ray",
    reason="a timed task's clock starts when escala hands it to Ray, so the start of a fresh "
    "Ray worker (after its workers died) counts against the task's timeout",
    raises=AssertionError,
)
def test_a_timeout_counts_the_run_not_the_wait_for_a_worker(cluster: SessionCluster) -> None:
    """Tasks far shorter than their timeout succeed right after every worker died: Dask's
    clock starts when a worker begins the task (``DaskSession.kill_workers`` says why it
    waits for new workers), Ray's when escala hands it to Ray, which then starts a worker."""
    cluster.kill_workers()
    try:
        # a builtin: a fresh worker unpickles it without importing this module
        outcomes = escala.map(abs, range(-2, 2), mode=cluster.mode, timeout=0.25, errors="collect")
        assert [o.value for o in outcomes] == [2, 1, 0, 1], [o.error for o in outcomes]
    finally:
        cluster.heal()


# -- mode="auto" with address= -------------------------------------------------------------


def test_auto_weighs_the_cluster_and_keeps_trivial_tasks_here(
    cluster: SessionCluster, fresh_figures: None
) -> None:
    address = cluster.address
    advice = escala.advise(inc, range(20_000), address=address)
    # the whole job takes milliseconds here: less than reaching any cluster costs
    assert advice.mode != cluster.mode
    figures = advice.cluster
    assert figures is not None and figures.reached
    assert (figures.engine, figures.address) == (cluster.mode, address)
    assert figures.cores in cluster.engine.cores
    assert figures.overhead > 0 and figures.start > 0
    size = f"{figures.cores} {cluster.engine.unit}" + ("" if figures.cores == 1 else "s")
    text = advice.explain()
    assert (
        f"The {cluster.engine.title} cluster at {address} has {size} but costs "
        f"{human_time(figures.overhead)} per task handed to it" in text
    )
    assert f"so {advice.mode} was chosen here." in text
    # the figures are kept: this run does not connect to weigh the cluster again
    assert escala.map(inc, range(20_000), address=address) == [x + 1 for x in range(20_000)]
    assert cluster.connected()  # the session's connection, still there


@pytest.mark.parametrize("measured", [True, False], ids=["measured-now", "measured-before"])
def test_auto_runs_on_the_cluster_when_it_pays(
    cluster: SessionCluster, fresh_figures: None, monkeypatch: pytest.MonkeyPatch, measured: bool
) -> None:
    """The session's cluster taken for one of 64 cores that costs a millisecond a task (the
    same machine's cores could never pay for a cluster): measured for real and then
    enlarged, or with such figures cached as if measured a moment ago, when the run
    connects to it only to run there."""
    if measured:
        reach = _cluster.reach

        def enlarged(*args: Any, **kwargs: Any) -> Any:
            backend, figures = reach(*args, **kwargs)
            return backend, replace(figures, cores=64, overhead=1e-3, start=0.01)

        monkeypatch.setattr(_cluster, "reach", enlarged)
    else:
        figures = Cluster(cluster.mode, cluster.address, cores=64, overhead=1e-3, start=0.01)
        key = (cluster.mode, cluster.address, None)
        monkeypatch.setitem(_cluster._cache, key, (time.monotonic(), figures))
    chosen: list[escala.Advice] = []
    opts = Options(mode="auto", address=cluster.address)
    got = collect(run_auto(spin_10ms, range(24), opts, ordered=False, on_advice=chosen.append))
    assert [value for value, _ in got] == [x * x for x in range(24)]
    text = chosen[0].explain()
    assert chosen[0].mode == cluster.mode, text
    assert f"has 64 {cluster.engine.unit}s and costs 1.0 ms per task" in text
    assert "The cluster was chosen" in text
    sampled = chosen[0].measured.samples if chosen[0].measured else 0
    here = os.getpid()
    assert {pid for _, pid in got[:sampled]} == {here}  # measured on a thread here
    assert here not in {pid for _, pid in got[sampled:]}  # the rest: there
