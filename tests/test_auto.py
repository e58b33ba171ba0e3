"""mode="auto" and escala.advise: measure, choose, explain, and never run a task twice."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import escala
from escala._options import engine_of
from escala.advisor import Cluster, Measurements, Reason
from escala.advisor._decide import decide, decide_cluster

# -- workloads of known shape -----------------------------------------------------------


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def spin_15ms(_: int) -> int:
    return spin(400_000)


def wait_20ms(x: int) -> int:
    time.sleep(0.02)
    return x


_BUFFER = bytes(range(256)) * 62_500  # 16 MB, made once: hashing it releases the GIL


def hash_big(seed: int) -> str:
    digest = hashlib.sha256(_BUFFER)  # no copy of the buffer: all of it hashed without the GIL
    digest.update(bytes([seed % 256]))
    return digest.hexdigest()


def inc(x: int) -> int:
    return x + 1


async def await_a_bit(x: int) -> int:
    await asyncio.sleep(0.001)
    return x


# -- the choice --------------------------------------------------------------------------


def test_waiting_work_goes_to_threads_with_a_measured_count() -> None:
    advice = escala.advise(wait_20ms, range(60))
    assert advice.mode == "threads"
    assert advice.reason is Reason.WAITS
    assert advice.adaptive
    assert advice.measured is not None
    assert advice.measured.cpu_share < 0.2
    assert 2 <= advice.workers <= 60
    text = advice.explain()
    assert "of wall time: this work waits on I/O, so threads were chosen" in text
    assert f"{advice.measured.cores} cores ×" in text or "1 core ×" in text


def test_computing_python_goes_to_processes_one_per_core() -> None:
    if escala.usable_cpus() < 2:
        pytest.skip("needs two usable cores")
    advice = escala.advise(spin_15ms, range(32))
    assert advice.mode == "processes"
    assert advice.reason is Reason.HOLDS_GIL
    assert advice.workers == escala.usable_cpus()
    assert advice.measured is not None and advice.measured.gil_held is True
    assert "holding the GIL: only processes run it on several cores" in advice.explain()
    assert f"one per core ({advice.workers})" in advice.explain()


def test_code_that_releases_the_gil_goes_to_threads() -> None:
    if escala.usable_cpus() < 2:
        pytest.skip("needs two usable cores")
    advice = escala.advise(hash_big, range(32))
    assert advice.mode == "threads"
    assert advice.reason is Reason.RELEASES_GIL
    assert advice.measured is not None and advice.measured.gil_held is False
    assert "it releases the GIL" in advice.explain()


def test_trivial_tasks_stay_sequential() -> None:
    for n in (100_000, 5_000_000):  # a whole job too small to pay, or tasks too short to
        advice = escala.advise(inc, range(n))
        assert advice.mode == "sequential"
        assert advice.reason is Reason.TOO_SMALL
        assert "sequential was chosen" in advice.explain().lower()
        assert re.search(r"\d\.\d\d µs per task", advice.explain())  # the figure, shown


def test_coroutine_functions_go_to_async_without_measuring() -> None:
    advice = escala.advise(await_a_bit, range(10))
    assert (advice.mode, advice.reason, advice.measured) == ("async", Reason.COROUTINE, None)
    assert "coroutine function" in advice.explain()


def test_coroutine_runs_are_recorded_with_what_they_measured() -> None:
    async def arun() -> list[int]:
        return await escala.amap(await_a_bit, range(30))

    with escala.advisor.recording() as runs:
        assert escala.map(await_a_bit, range(40)) == list(range(40))
        assert list(escala.imap(await_a_bit, iter(range(20)))) == list(range(20))
        assert escala.map(await_a_bit, range(20), workers=4) == list(range(20))
        assert asyncio.run(arun()) == list(range(30))
        escala.map(await_a_bit, range(5), mode="async")  # chosen by the caller: not auto's
    assert [run.reason for run in runs] == [Reason.COROUTINE] * 4
    # the same decision advise() gives; it starts at the input's length when that is shorter
    assert [run.workers for run in runs] == [40, 512, 4, 30]
    assert runs[0].workers == escala.advise(await_a_bit, range(40)).workers
    for run, tasks in zip(runs, (40, 20, 20, 30), strict=True):
        (leg,) = run.legs
        assert (leg.mode, leg.tasks) == ("async", tasks)
        assert leg.measured is not None and 0 < leg.measured <= run.workers * 1.05
        assert "tasks overlapped" in run.explain()
    assert runs[2].legs[0].workers == 4  # a fixed limit stays where the caller put it


def spawn_spinner(seconds: float) -> int:
    """Wait for a child interpreter that computes for ``seconds``."""
    code = (
        f"import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass"
    )
    return subprocess.run([sys.executable, "-c", code], check=True).returncode


@pytest.mark.parametrize("seconds", [0.02, 0.3], ids=["children-end", "child-still-running"])
def test_a_child_process_computing_is_seen_as_computing(seconds: float) -> None:
    # The task's own thread only waits, but its child computes on this machine's cores:
    # measured, whether children ended while sampling or one still ran at the decision
    advice = escala.advise(spawn_spinner, [seconds] * 8)
    m = advice.measured
    assert m is not None and m.child_cpu > 0
    assert m.computing == m.cpu + m.child_cpu and m.waiting < m.wall - m.cpu
    assert "child processes it waited for" in advice.explain()


def test_threads_for_waiting_children_count_their_computing() -> None:
    cores = 2
    waits = replace(_measurements(0.01, 200), cpu=0.0005, gil_held=False, cores=cores)
    on_io = decide(waits, 190)
    on_children = decide(replace(waits, child_cpu=0.009), 190)
    assert (on_io.reason, on_children.reason) == (Reason.WAITS, Reason.WAITS)
    assert on_io.workers == round(cores * (1 + 0.0095 / 0.0005))
    assert on_children.workers == cores  # no waiting left but the children's computing
    assert on_children.speedup <= cores


def test_a_hint_skips_measuring() -> None:
    ran: list[int] = []

    @escala.task(kind="io")
    def fetch(x: int) -> int:
        ran.append(x)
        return x

    advice = escala.advise(fetch, range(10))
    assert (advice.mode, advice.reason, advice.measured) == ("threads", Reason.HINT_IO, None)
    assert ran == []  # nothing ran: no measuring
    assert 'kind="io"' in advice.explain()


def test_work_that_cannot_be_pickled_never_goes_to_processes() -> None:
    if escala.usable_cpus() < 2:
        pytest.skip("needs two usable cores")
    lock = threading.Lock()

    def spin_with_lock(n: int) -> int:
        with lock:
            return spin_15ms(n)

    advice = escala.advise(spin_with_lock, range(32))
    assert advice.mode == "sequential"
    assert advice.reason is Reason.NOT_PICKLABLE
    assert "cannot be pickled" in advice.explain()


def test_a_free_threaded_build_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    advice = escala.advise(spin_15ms, range(32))
    assert advice.measured is not None and advice.measured.free_threaded
    assert advice.mode == "threads"
    assert "no GIL" in advice.explain()


# -- the run -------------------------------------------------------------------------------


class Runs:
    """Counts each run of each item, in this process and in worker processes alike.

    In this process (sequential, threads) a list under a lock; from worker processes a
    marker file per run (a list would be the worker's own copy). Counting must not change
    the work's nature: a file per trivial task would make it I/O.
    """

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.pid = os.getpid()
        self.here: list[int] = []
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "pid": self.pid}  # a worker counts in files only

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, here=[], lock=threading.Lock())

    def note(self, x: int) -> None:
        if os.getpid() == self.pid:
            with self.lock:
                self.here.append(x)
        else:
            (self.folder / f"{x}-{os.getpid()}-{time.perf_counter_ns()}").touch()

    def all(self) -> list[int]:
        there = [int(name.split("-")[0]) for name in os.listdir(self.folder)]
        return sorted(self.here + there)


def counted(runs: Runs, work: Any) -> Any:
    def task(x: int) -> Any:
        runs.note(x)
        return work(x)

    return task


@pytest.mark.parametrize(
    ("work", "n", "expected"),
    [
        (inc, 3000, "sequential"),
        (wait_20ms, 40, "threads"),
        (spin_15ms, 16, "processes"),
    ],
    ids=["sequential", "threads", "processes"],
)
def test_no_task_runs_twice_because_it_was_measured(
    tmp_path: pathlib.Path, work: Any, n: int, expected: str
) -> None:
    if expected == "processes" and escala.usable_cpus() < 2:
        pytest.skip("needs two usable cores")
    chosen: list[escala.Advice] = []
    from escala._auto import run_auto
    from escala._core.plan import collect
    from escala._options import Options

    runs = Runs(tmp_path)
    task = counted(runs, work)
    opts = Options(mode="auto")
    results = collect(run_auto(task, range(n), opts, ordered=False, on_advice=chosen.append))
    assert results == [work(x) for x in range(n)]
    assert chosen[0].mode == expected, f"{chosen[0].measured}\n{chosen[0].explain()}"
    assert runs.all() == list(range(n))  # each item exactly once


def test_auto_is_the_default_and_returns_the_same_results() -> None:
    assert escala.map(spin, [10_000] * 12) == [spin(10_000)] * 12
    assert list(escala.imap(wait_20ms, range(30))) == list(range(30))
    assert escala.map(inc, range(5000), mode="auto") == [x + 1 for x in range(5000)]


def test_imap_auto_streams_an_endless_input() -> None:
    def naturals() -> Any:
        n = 0
        while True:
            yield n
            n += 1

    results = escala.imap(inc, naturals())
    assert [next(results) for _ in range(10_000)] == list(range(1, 10_001))
    results.close()  # type: ignore[attr-defined]


def test_errors_in_sampled_items_follow_the_error_policy() -> None:
    def fail_first(x: int) -> int:
        if x == 0:
            raise KeyError("the very first item")
        return x

    with pytest.raises(KeyError, match="the very first item"):
        escala.map(fail_first, range(100))
    outcomes = escala.map(fail_first, range(100), errors="collect")
    assert not outcomes[0].ok
    assert [o.value for o in outcomes[1:]] == list(range(1, 100))


def test_a_sampled_failure_is_retried_like_any_other(tmp_path: pathlib.Path) -> None:
    def flaky(x: int) -> int:
        marker = tmp_path / str(x)
        if x == 0 and not marker.exists():
            marker.touch()
            raise ConnectionError("once")
        return x

    outcomes = escala.map(
        flaky, range(50), retries=escala.Retry(1, backoff=0.001), errors="collect"
    )
    assert [o.value for o in outcomes] == list(range(50))
    assert outcomes[0].attempts == 2


def test_an_input_that_breaks_while_sampled_raises_its_error() -> None:
    def items() -> Any:
        yield 1
        raise ValueError("the input broke")

    with pytest.raises(ValueError, match="the input broke"):
        escala.map(inc, items())  # type: ignore[call-overload]


def test_a_task_still_measured_when_it_overruns_its_timeout() -> None:
    release = threading.Event()

    def slow_first(x: int) -> int:
        if x == 0:
            release.wait(30)
        return x

    try:
        outcomes = escala.map(slow_first, range(5), timeout=0.3, errors="collect")
    finally:
        release.set()
    assert isinstance(outcomes[0].error, escala.TaskTimeout)
    assert "measuring" in str(outcomes[0].error)
    assert [o.value for o in outcomes[1:]] == [1, 2, 3, 4]


def test_auto_with_workers_given_keeps_them() -> None:
    advice = escala.advise(wait_20ms, range(60))
    assert advice.mode == "threads"
    results = escala.map(wait_20ms, range(20), workers=5)
    assert results == list(range(20))


def test_a_pool_needs_a_mode_of_its_own() -> None:
    with pytest.raises(ValueError, match="A Pool keeps one kind of worker"):
        escala.Pool(mode="auto")


# -- a cluster named by address= -----------------------------------------------------------
# The decision is a pure function of measured figures, so it is tested here with figures of
# a cluster bigger than this machine; test_cluster.py weighs the real local clusters of
# the session (as many cores as this machine: what they can promise is less).


def _measurements(
    wall: float, total: int, *, samples: int = 2, picklable: bool = True
) -> Measurements:
    """What sampling computing Python that holds the GIL would measure on two cores."""
    return Measurements(
        samples=samples,
        lower_bound=False,
        wall=wall,
        cpu=wall,
        queued=0.0,
        gil_held=True,
        gil_wait=0.004,
        free_threaded=False,
        arg_bytes=5,
        result_bytes=5,
        picklable=picklable,
        total=total,
        cores=2,
        overhead={"threads-task": 20e-6, "processes-start": 0.03, "processes-task": 40e-6},
    )


RAY_16 = Cluster("ray", "10.0.0.5:6379", cores=16, overhead=1.2e-3, start=0.35)


def _weigh(
    wall: float,
    total: int,
    cluster: Cluster = RAY_16,
    *,
    picklable: bool = True,
    workers: int | None = None,
) -> escala.Advice:
    m = _measurements(wall, total, picklable=picklable)
    return decide_cluster(decide(m, total - m.samples), cluster, total - m.samples, workers)


def test_long_tasks_go_to_a_cluster_that_pays_for_its_overhead() -> None:
    advice = _weigh(0.2, 402)
    assert (advice.mode, advice.reason, advice.workers) == ("ray", Reason.CLUSTER, 16)
    assert advice.cluster is not None and advice.cluster.local_mode == "processes"
    assert advice.cluster.predicted * 1.25 <= advice.cluster.local
    text = advice.explain()
    assert "The Ray cluster at 10.0.0.5:6379 has 16 CPUs and costs 1.2 ms per task" in text
    assert "these tasks take 200.0 ms each" in text
    assert "with processes here. The cluster was chosen, 16 tasks at once." in text


def test_short_tasks_stay_here_and_the_overhead_is_named() -> None:
    advice = _weigh(50e-6, 802)  # 40 ms of work in all: less than the cluster's start
    assert advice.mode != "ray"
    assert advice.cluster is not None and advice.cluster.overhead_share > 0.9
    text = advice.explain()
    assert "has 16 CPUs but costs 1.2 ms per task handed to it, plus 350.0 ms" in text
    assert "these tasks take 50 µs each" in text
    assert re.search(r"it would spend 9\d% of its time on overhead", text)
    assert f"so {advice.mode} was chosen here." in text


def test_a_cluster_no_bigger_than_this_machine_does_not_pay() -> None:
    same = replace(RAY_16, cores=2, overhead=1e-3, start=0.05)
    advice = _weigh(0.2, 402, same)
    assert advice.mode == "processes"
    assert "has 2 CPUs but costs 1.0 ms" in advice.explain()


def test_a_cluster_must_win_by_a_margin() -> None:
    # slightly sooner than processes here, but not by CLUSTER_GAIN
    close = replace(RAY_16, cores=2, overhead=0.0, start=0.0)
    advice = _weigh(0.2, 402, close)
    assert advice.mode == "processes"
    assert advice.cluster is not None
    assert advice.cluster.predicted < advice.cluster.local < 1.25 * advice.cluster.predicted
    assert "not the 1.25× sooner a cluster must promise" in advice.explain()


def test_work_that_cannot_be_pickled_never_goes_to_a_cluster() -> None:
    advice = _weigh(0.2, 402, picklable=False)
    assert advice.mode == "sequential"
    assert "cannot be pickled, so they cannot be sent to it" in advice.explain()


def test_the_callers_workers_cap_the_cluster() -> None:
    advice = _weigh(0.2, 402, workers=4)
    assert (advice.mode, advice.workers) == ("ray", 4)


def test_a_dask_cluster_is_counted_in_worker_threads() -> None:
    dask = replace(RAY_16, engine="dask", address="tcp://10.0.0.5:8786")
    text = _weigh(0.2, 402, dask).explain()
    assert "The Dask cluster at tcp://10.0.0.5:8786 has 16 worker threads and costs" in text


@given(
    wall=st.floats(min_value=1e-8, max_value=10.0),
    total=st.integers(min_value=3, max_value=10_000_000),
    cores=st.integers(min_value=1, max_value=4096),
    overhead=st.floats(min_value=0.0, max_value=1.0),
    start=st.floats(min_value=0.0, max_value=30.0),
    workers=st.one_of(st.none(), st.integers(min_value=1, max_value=64)),
)
def test_property_the_cluster_wins_only_by_a_margin_it_can_keep(
    wall: float, total: int, cores: int, overhead: float, start: float, workers: int | None
) -> None:
    """Whatever the figures: the cluster is chosen only when this machine's prediction is
    CLUSTER_GAIN × the cluster's, never for a job shorter here than the cluster's start,
    never with more tasks at once than the cluster or the caller allow."""
    cluster = Cluster("dask", "tcp://10.0.0.5:8786", cores=cores, overhead=overhead, start=start)
    advice = _weigh(wall, total, cluster, workers=workers)
    weighed = advice.cluster
    assert weighed is not None and weighed.reached
    if advice.mode == "dask":
        assert advice.reason is Reason.CLUSTER
        assert weighed.local >= 1.25 * weighed.predicted
        assert weighed.local >= 1.25 * start
        assert 1 <= advice.workers <= min(cores, workers or cores)
    else:
        assert advice.reason is not Reason.CLUSTER
    assert "cluster at tcp://10.0.0.5:8786" in advice.explain()


def test_without_measurements_the_cluster_is_not_weighed() -> None:
    @escala.task(kind="cpu")
    def crunch(x: int) -> int:
        return x

    advice = escala.advise(crunch, range(10), address="tcp://127.0.0.1:1")  # never contacted
    assert advice.cluster is not None and not advice.cluster.reached
    assert "The Dask cluster at tcp://127.0.0.1:1 was not weighed: nothing was measured" in (
        advice.explain()
    )
    coroutine = escala.advise(await_a_bit, range(10), address="127.0.0.1:1")
    assert "was not weighed: a coroutine function runs on this machine" in coroutine.explain()
    assert escala.map(await_a_bit, range(5), address="127.0.0.1:1") == list(range(5))


@pytest.mark.parametrize(
    ("address", "engine"),
    [
        ("tcp://10.0.0.5:8786", "dask"),
        ("tls://scheduler.example.com:8786", "dask"),
        ("TCP://[::1]:8786", "dask"),
        ("ucx://10.0.0.5:13337", "dask"),
        ("ray://10.0.0.5:10001", "ray"),
        ("10.0.0.5:6379", "ray"),
        ("head-node.example.com:6379", "ray"),
        ("[::1]:6379", "ray"),
        ("auto", "ray"),
    ],
)
def test_the_engine_comes_from_the_address(address: str, engine: str) -> None:
    assert engine_of(address) == engine


@pytest.mark.parametrize("address", ["http://10.0.0.5:8265", "10.0.0.5", "localhost:", "a b:1"])
def test_an_address_of_neither_engine_is_refused_at_the_door(address: str) -> None:
    message = "cannot tell which engine runs the cluster at"
    with pytest.raises(ValueError, match=message):
        escala.map(inc, [1], address=address)
    with pytest.raises(ValueError, match=message):
        escala.advise(inc, [1], address=address)


def test_an_address_of_the_other_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="names a Ray cluster, not a Dask one"):
        escala.map(inc, [1], mode="dask", address="ray://10.0.0.5:10001")
    with pytest.raises(ValueError, match="names a Dask cluster, not a Ray one"):
        escala.map(inc, [1], mode="ray", address="tcp://10.0.0.5:8786")


def test_an_address_needs_a_mode_that_can_use_it() -> None:
    with pytest.raises(ValueError, match=r"mode='auto' \(with escala\.map or escala\.imap"):
        escala.Pool(address="tcp://10.0.0.5:8786")
    with pytest.raises(ValueError, match="cannot weigh the cluster"):
        asyncio.run(escala.amap(inc, [1], mode="auto", address="tcp://10.0.0.5:8786"))


# -- a first task that outlasts the sampling window ------------------------------------------


def compute_for(seconds: float, x: int, mark: pathlib.Path | None = None) -> int:
    """Compute, holding the GIL, for ``seconds`` of this thread's CPU time."""
    if mark is not None:
        with mark.open("a") as f:
            f.write(f"{x}\n")
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return x


def _still_running(wall: float, total: int) -> Measurements:
    """What sampling measures of a first task still computing at the window's end."""
    return replace(_measurements(wall, total, samples=1), lower_bound=True)


def test_a_task_still_running_is_a_lower_bound_that_can_pay_for_processes() -> None:
    # Two items, the first still computing after 50 ms: the second would wait for it here
    # (the GIL), but runs beside it in a process, whose start (30 ms) it pays for.
    advice = decide(_still_running(0.05, 2), remaining=1)
    assert (advice.mode, advice.reason) == ("processes", Reason.HOLDS_GIL)
    assert advice.speedup > 1.1


def test_a_short_lower_bound_does_not_pay_for_processes_yet() -> None:
    # 10 ms so far, against 30 ms to start processes: not yet
    assert decide(_still_running(0.01, 2), remaining=1).mode == "sequential"
    # and a finished task of 50 ms with one item left: nothing to run beside it
    assert decide(_measurements(0.05, 2, samples=1), remaining=1).mode == "sequential"


@pytest.mark.timeout(60)
def test_few_long_tasks_go_to_processes() -> None:
    """As many items as cores, each far longer than the window: auto once saw 'over 18 ms'
    as 18 ms and ran them one after another (1.7x the processes time)."""
    advice = escala.advise(functools.partial(compute_for, 1.0), range(2))
    assert advice.mode == "processes", advice.explain()
    assert advice.measured is not None and advice.measured.lower_bound
    assert "still running" in advice.explain()


@pytest.mark.timeout(60)
def test_few_long_tasks_run_once_each_in_order(tmp_path: pathlib.Path) -> None:
    mark = tmp_path / "ran"
    task = functools.partial(compute_for, 0.5, mark=mark)
    assert escala.map(task, range(2)) == [0, 1]
    assert sorted(mark.read_text().split()) == ["0", "1"]
