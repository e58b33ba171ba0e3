"""Shared fixtures: every mode as a parameter, and a check that nothing is left behind."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, settings

import escala
import pg
from escala.advisor import _cluster

# Hypothesis: no per-example deadline (a process pool starts in each example), fewer
# examples on CI, where the whole suite shares two cores.
settings.register_profile(
    "default",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("default"), max_examples=15)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# The local modes, then the optional engines that are installed: dask runs every behaviour
# test on one real local cluster shared by the session (see ``dask_cluster``).
HAS_DASK = importlib.util.find_spec("distributed") is not None
HAS_RAY = importlib.util.find_spec("ray") is not None
ALL_MODES = list(escala.MODES) + (["dask"] if HAS_DASK else []) + (["ray"] if HAS_RAY else [])
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Processes that multiprocessing keeps for the life of the interpreter, by design.
_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
# Threads that distributed keeps for the life of the interpreter, one of each, shared by
# every Dask client (it runs future callbacks and deserialisation on them).
_THREAD_HELPERS = ("Dask-Callback-Thread", "Dask-Offload")
# Threads and processes owned by session fixtures (the Dask cluster and its client).
_SESSION_THREADS: set[threading.Thread] = set()
_SESSION_PIDS: set[int] = set()

# The cluster runs in a child process of its own, so that its scheduler, nannies and
# worker processes (restarted when a test kills one) are all its descendants, owned by the
# session; the tests' process holds only the client.
_CLUSTER_SCRIPT = """
import sys, dask, distributed
if __name__ == "__main__":
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, silence_logs=50,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        )
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()  # until the tests' process closes the pipe (or dies)
    cluster.close()
"""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of the session's PostgreSQL server (its ``postgres`` database)."""
    with pg.server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    with pg.database(pg_server) as url:
        yield url


#: Workers started for the session's Dask scheduler when its own nannies were gone.
_DASK_RESCUES: list[subprocess.Popen[bytes]] = []
#: The session's Dask cluster: workers per run, and the environment its workers import from.
DASK_WORKERS = 2


def ensure_dask_workers(client: Any) -> None:
    """Wait until the session's Dask cluster has its workers again, starting new ones if
    the cluster lost its nannies.

    A test that kills a worker leaves its nanny to start another. Once in a loaded CI run
    the nannies themselves were gone, and every later Dask test waited in vain: then new
    workers (a ``dask worker`` process, owned by the session) join the same scheduler, and
    the client, which tests hold, stays the same.
    """
    try:
        client.wait_for_workers(DASK_WORKERS, timeout=30)
        return
    except (TimeoutError, OSError):
        pass
    missing = DASK_WORKERS - len(client.scheduler_info()["workers"])
    if missing > 0:
        tests = str(pathlib.Path(__file__).parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, *sys.path]))}
        rescue = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                client.scheduler.address,
                "--nworkers",
                str(missing),
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _SESSION_PIDS.add(rescue.pid)
        _DASK_RESCUES.append(rescue)
    client.wait_for_workers(DASK_WORKERS, timeout=60)


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Any]:
    """A real Dask LocalCluster (2 worker processes × 1 thread, on 127.0.0.1, no dashboard)
    for the whole session, and a client connected to it."""
    import distributed

    tests = str(pathlib.Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, *sys.path]))}
    threads = _threads()
    host = subprocess.Popen(
        [sys.executable, "-c", _CLUSTER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    _SESSION_PIDS.add(host.pid)
    assert host.stdout is not None and host.stdin is not None
    address = host.stdout.readline().strip()
    if not address:
        host.kill()
        host.wait()
        host.stdin.close()
        host.stdout.close()
        pytest.fail("the Dask cluster did not start")
    client = distributed.Client(address, set_as_default=False, timeout=30)
    _SESSION_THREADS.update(_threads() - threads)
    try:
        yield client
    finally:
        for rescue in _DASK_RESCUES:
            rescue.terminate()
            try:
                rescue.wait(30)
            except subprocess.TimeoutExpired:
                rescue.kill()
                rescue.wait()
        client.close()
        host.stdin.close()
        host.stdout.close()
        try:
            host.wait(30)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray (2 CPUs, on 127.0.0.1, no dashboard, a 200 MiB object store) started
    once in this process for the whole session; yields its address.

    Ray allows one connection per process, so this is the one ``mode="ray"`` reuses
    (``ray.is_initialized()``). Its GCS, raylet and helpers are children of this process,
    and the workers (restarted when a test kills one) the raylet's: all owned by the
    session, as are the threads Ray's driver keeps.
    """
    import ray

    threads = _threads()
    children = {p.pid for p in psutil.Process().children()}
    # the workers import the tests' modules by name: the raylet passes its environment on
    tests = str(pathlib.Path(__file__).parent)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, *sys.path]))
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 1024 * 1024,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
            log_to_driver=False,
        )
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    _SESSION_PIDS.update({p.pid for p in psutil.Process().children()} - children)
    _SESSION_THREADS.update(_threads() - threads)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def fresh_figures() -> Iterator[None]:
    """No cluster figures measured by an earlier test (``mode="auto"`` keeps them a minute
    per address): this one measures its own."""
    _cluster.forget()
    yield
    _cluster.forget()


def _session_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "dask":
        client = request.getfixturevalue("dask_cluster")
        # an earlier test may have killed a worker: its nanny is still starting the new
        # one, and a test that needs two tasks at once would find one worker
        ensure_dask_workers(client)
        with client.as_current():
            yield "dask"
    elif request.param == "ray":
        request.getfixturevalue("ray_cluster")
        yield "ray"
    else:
        yield str(request.param)


@pytest.fixture(params=ALL_MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each behaviour test runs once per execution model, with the mode as its id.

    Under dask the session's cluster is the current Dask client, so ``mode="dask"`` without
    an address runs there, as it would in a program that made its own client; under ray
    the session's Ray is this process's connection (``ray.init`` was called).
    """
    yield from _session_mode(request)


@pytest.fixture(params=[m for m in ALL_MODES if m != "sequential"])
def concurrent_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """The modes that run several tasks at once."""
    yield from _session_mode(request)


def _children(owned_by: Collection[int] = ()) -> set[int]:
    """Return our descendants, but those of ``owned_by`` (long-lived fixtures' processes,
    such as a server started once per module, whose workers come and go as it sees fit)."""
    found = set()
    me = os.getpid()
    for child in psutil.Process().children(recursive=True):
        try:
            if owned_by and any(p.pid in owned_by for p in child.parents() if p.pid != me):
                continue
            if child.status() == psutil.STATUS_ZOMBIE:
                found.add(child.pid)  # an unreaped child is a leak too
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if not any(helper in cmdline for helper in _HELPERS):
            found.add(child.pid)
    return found


def _threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t.is_alive() and t not in _SESSION_THREADS and not t.name.startswith(_THREAD_HELPERS)
    }


@pytest.fixture(autouse=True)
def nothing_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a worker process or thread running after it returns.

    Threads that finish a task escala could not stop (threads and sequential mode) need a
    moment to exit after the test releases them, so the check waits, up to a limit, for
    the counts to come back; it polls because there is nothing to wait on for "a thread
    someone else started has exited".
    """
    threads_before = _threads()
    children_before = _children()
    yield
    deadline = time.monotonic() + 10
    while True:
        threads = _threads() - threads_before
        owned = children_before | _SESSION_PIDS
        children = _children(owned_by=owned) - owned
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    names = sorted(t.name for t in threads)
    pytest.fail(f"left behind: threads {names}, child processes {sorted(children)}")
