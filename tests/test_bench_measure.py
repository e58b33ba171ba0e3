"""Measuring runs and comparing them with sequential: run_one, compare, Comparison.figures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

import escala
from escala import bench

SCALE = 0.1
RUN_MODES = ["sequential", "threads", "processes", "async"]
needs_advise = pytest.mark.skipif(
    not hasattr(escala, "advise"), reason="escala.advise and mode='auto' have not landed yet"
)


def double(x: int) -> int:
    return 2 * x


def fails_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("no 2 here")
    return x


def whose(x: int) -> int:
    return os.getpid()


# -- run_one --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RUN_MODES)
def test_run_one_measures_a_correct_run(mode: str) -> None:
    with bench.workloads.get("sleep-io").prepared(SCALE) as prepared:
        run = bench.run_one(prepared, mode, workload="sleep-io")
    assert run.status is bench.Status.OK, run.error
    assert (run.workload, run.mode) == ("sleep-io", mode)
    assert run.correct and run.error is None and run.skipped is None
    assert run.wall > 0
    assert run.cpu >= 0
    assert run.peak_rss > 0
    assert run.workers >= 1


def test_run_one_reports_the_default_and_the_given_workers() -> None:
    prepared = bench.Prepared(double, [1, 2, 3])
    assert bench.run_one(prepared, "sequential").workers == 1
    assert bench.run_one(prepared, "threads").workers == min(32, escala.usable_cpus() + 4)
    assert bench.run_one(prepared, "threads", workers=3).workers == 3


def test_http_in_worker_processes() -> None:
    with bench.workloads.get("http-io").prepared(SCALE) as prepared:
        run = bench.run_one(prepared, "processes", workers=2)
    assert run.status is bench.Status.OK, run.error


def test_cpu_of_worker_processes_is_counted() -> None:
    with bench.workloads.get("cpu-python").prepared(SCALE) as prepared:
        inline = bench.run_one(prepared, "sequential")
        spread = bench.run_one(prepared, "processes", workers=2)
    assert spread.status is bench.Status.OK, spread.error
    # The work happens in the children: without RUSAGE_CHILDREN this would be near zero.
    assert spread.cpu > 0.5 * inline.cpu


@pytest.mark.parametrize("mode", ["sequential", "threads", "processes"])
def test_an_exception_becomes_the_error(mode: str) -> None:
    run = bench.run_one(bench.Prepared(fails_on_two, [1, 2, 3]), mode)
    assert run.status is bench.Status.FAILED
    assert run.error is not None and run.error.startswith("ValueError: no 2 here")
    assert not run.correct and not run.ran


def test_an_unknown_mode_becomes_the_error() -> None:
    run = bench.run_one(bench.Prepared(double, [1]), "warp")
    assert run.status is bench.Status.FAILED
    assert "unknown mode 'warp'" in run.error


def test_async_is_skipped_without_an_async_form() -> None:
    run = bench.run_one(bench.Prepared(double, [1, 2]), "async")
    assert run.status is bench.Status.SKIPPED
    assert run.skipped is not None and "no async form" in run.skipped
    assert not run.ran and run.error is None


def test_different_results_are_marked_wrong() -> None:
    prepared = bench.Prepared(whose, [1, 2])
    assert bench.run_one(prepared, "sequential").status is bench.Status.OK
    run = bench.run_one(prepared, "processes", workers=1)
    assert run.status is bench.Status.WRONG
    assert run.ran and not run.correct


def test_peak_memory_counts_child_processes() -> None:
    from escala.bench._sampler import PeakRss

    me = psutil.Process().memory_info().rss
    with PeakRss(interval=0.005) as memory:
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        try:
            # A sample including the child must come; poll for it (nothing to wait on).
            target = me + 0.5 * psutil.Process(child.pid).memory_info().rss
            deadline = time.monotonic() + 10
            while (memory.peak or 0) < target and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            child.communicate(b"")
    assert memory.peak >= target
    assert memory.cpu >= 0


# -- compare and figures --------------------------------------------------------------


def test_compare_runs_each_mode_in_order() -> None:
    modes = ("threads", "sequential", "async")
    comparison = bench.compare("sleep-io", modes, scale=SCALE)
    assert tuple(r.mode for r in comparison.results) == modes
    assert all(r.status is bench.Status.OK for r in comparison.results)
    assert comparison.workload == "sleep-io" and comparison.expected == "threads"
    assert comparison.cores == escala.usable_cpus()
    base = comparison.figures(comparison.result("sequential"))
    assert base.speedup == 1.0 and base.efficiency == 1.0 and base.cores_used == 1
    threads = comparison.figures(comparison.result("threads"))
    assert threads.speedup > 0
    assert threads.cores_used == min(comparison.result("threads").workers, comparison.cores)
    assert threads.cpu_use >= 0
    assert comparison.fastest() in comparison.results


def test_compare_without_sequential_has_no_speedup() -> None:
    comparison = bench.compare("trivial", ("threads",), scale=SCALE, workers=2, repeat=2)
    (run,) = comparison.results
    assert run.status is bench.Status.OK and run.workers == 2
    figures = comparison.figures(run)
    assert figures.speedup is None and figures.efficiency is None
    assert figures.cpu_use is not None


def test_compare_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        bench.compare("nope")
    with pytest.raises(ValueError, match="repeat"):
        bench.compare("trivial", repeat=0)


def test_compare_takes_a_workload_of_your_own() -> None:
    class Doubling(bench.Workload):
        name = "doubling"
        title = "Doubling"
        expected = "sequential"
        explanation = "Tiny."

        @contextmanager
        def prepared(self, scale: float = 1.0) -> Iterator[object]:
            yield bench.Prepared(double, list(range(10)))

    comparison = bench.compare(Doubling(), ("sequential", "threads", "async"), scale=SCALE)
    assert [r.status for r in comparison.results] == [
        bench.Status.OK,
        bench.Status.OK,
        bench.Status.SKIPPED,
    ]
    assert comparison.figures(comparison.results[2]).speedup is None


def _run(mode: str, wall: float, cpu: float, workers: int, **kw: object):
    return bench.RunResult("w", mode, workers, wall, cpu, 1 << 20, True, **kw)


def test_figures_against_sequential() -> None:
    from escala.advisor._advice import Advice, Reason

    advice = Advice(mode="threads", workers=6, batch=1, speedup=4.0, reason=Reason.WAITS)
    runs = (
        _run("sequential", 1.0, 1.0, 1),
        _run("threads", 0.25, 0.5, 6),
        _run("processes", 0.5, 1.0, 2),
        _run("async", 0.1, 0.1, 100),
        _run("auto", 0.2, 0.4, 6, advice=advice),
        _run("threads", 9.0, 0.0, 6, error="OSError: boom"),
    )
    comparison = bench.Comparison("w", "W", "threads", "", 2, 1.0, runs)
    seq, threads, procs, asyn, auto, failed = (comparison.figures(r) for r in runs)
    assert (seq.speedup, seq.efficiency, seq.cpu_use) == (1.0, 1.0, 0.5)
    assert (threads.speedup, threads.efficiency, threads.cpu_use) == (4.0, 2.0, 1.0)
    assert (procs.speedup, procs.efficiency, procs.cores_used) == (2.0, 1.0, 2)
    assert (asyn.speedup, asyn.efficiency, asyn.cores_used) == (10.0, 10.0, 1)
    assert (auto.speedup, auto.cores_used) == (5.0, 2)
    assert (failed.speedup, failed.efficiency, failed.cpu_use) == (None, None, None)
    assert comparison.fastest() is runs[3]
    assert comparison.fastest(["sequential", "threads", "processes"]) is runs[1]
    assert comparison.advice is advice


@needs_advise
def test_auto_shows_the_advice_and_runs() -> None:
    comparison = bench.compare("sleep-io", ("sequential", "auto"), scale=SCALE)
    auto = comparison.result("auto")
    assert auto.status is bench.Status.OK, auto.error
    assert auto.advice is not None and auto.advice is comparison.advice
    assert auto.workers == auto.advice.workers
    assert auto.advice.mode in escala.MODES
    assert comparison.figures(auto).speedup is not None
