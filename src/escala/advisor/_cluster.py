"""Weighing a cluster named by ``address=``: how many tasks it runs at once, what one costs.

    weigh(advice, address) ──▶ engine_of(address): "dask" or "ray", from its form
        │ figures cached for this address? ──▶ decide_cluster at once (nothing contacted)
        ▼
    reach: the engine's backend, started ──▶ connect (and ship the no-op, run the
        │                                    initializer: one empty task per slot)  = start
        │                                ──▶ 4 empty tasks a slot, all slots busy  = overhead
        │                                ──▶ capacity(): worker threads or CPUs    = cores
        ▼
    decide_cluster(advice, figures) ──▶ the cluster chosen: its started backend goes to the run
                                    └─▶ this machine chosen: the backend is shut down (the
                                        cluster itself keeps running)

A cluster is reached only when the advice was measured and items remain. Its figures are
kept for ``CACHE_SECONDS`` per address, so that a program calling ``escala.map`` in a loop
connects only to run there; the cluster is reached again once they are older.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

from .._errors import EscalaError
from .._options import engine_of
from .._worker.messages import Batch, Call, Done
from ..backends import create
from ..backends.base import ClusterBackend
from ._advice import Advice, Cluster, Reason
from ._decide import decide_cluster

__all__ = ["CACHE_SECONDS", "forget", "reach", "weigh"]

#: Seconds a cluster's measured figures are reused for the same address.
CACHE_SECONDS = 60.0
#: Empty tasks timed per slot of the cluster (within the bounds below).
HANDOFFS_PER_SLOT = 4
MIN_HANDOFFS = 16
MAX_HANDOFFS = 256
#: Seconds the empty tasks may take before the cluster is called unresponsive.
PROBE_TIMEOUT = 60.0

# (engine, address, workers) -> (time.monotonic() when measured, figures)
_cache: dict[tuple[str, str, int | None], tuple[float, Cluster]] = {}
_lock = threading.Lock()


def _noop(x: int) -> int:
    return x


def forget() -> None:
    """Drop every cluster's cached figures: the next run measures again."""
    with _lock:
        _cache.clear()


def weigh(
    advice: Advice,
    address: str,
    *,
    workers: int | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> tuple[Advice, ClusterBackend | None]:
    """Weigh the cluster at ``address`` against the advice for this machine.

    Args:
        advice: what :func:`~escala.advisor.measure` chose for this machine.
        address: the cluster's address (its engine comes from its form).
        workers: the caller's cap on tasks at once.
        initializer: the run's worker initializer (it runs in the cluster's workers when
            the cluster is reached, as it does on the local probe thread).
        initargs: its arguments.

    Returns:
        The advice, with the weighed cluster attached (``Advice.cluster``), and the
        cluster's started backend when the advice is to run there (the caller owns it),
        else ``None``.

    Raises:
        EscalaError: the cluster could not be reached, or did not run empty tasks.
        EngineMissing: the engine the address names is not installed.
    """
    engine = engine_of(address)
    figures = Cluster(engine, address)
    m = advice.measured
    if m is None or advice.reason is Reason.ALL_SAMPLED:
        return replace(advice, cluster=figures), None  # nothing to weigh it against
    remaining = None if m.total is None else max(0, m.total - m.samples)
    key = (engine, address, workers)
    with _lock:
        cached = _cache.get(key)
    backend: ClusterBackend | None = None
    if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
        figures = cached[1]
    else:
        backend, figures = reach(
            engine, address, workers=workers, initializer=initializer, initargs=initargs
        )
        with _lock:
            _cache[key] = (time.monotonic(), figures)
    try:
        decided = decide_cluster(advice, figures, remaining, workers)
        if decided.mode != engine:
            if backend is not None:
                backend.shutdown(cancel=False)
            return decided, None
        if backend is None:  # chosen from cached figures: connect now
            backend = _connect(engine, address, workers, initializer, initargs)
        return decided, backend
    except BaseException:
        if backend is not None:
            backend.shutdown(cancel=True)
        raise


def reach(
    engine: str,
    address: str,
    *,
    workers: int | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> tuple[ClusterBackend, Cluster]:
    """Connect to a cluster and measure it with empty tasks.

    Returns:
        The started backend (the caller shuts it down) and the cluster's figures:
        ``cores``, ``start`` (connecting, and one empty task per slot, which ships the
        function and runs the initializer) and ``overhead`` (seconds per task when empty
        tasks keep every slot busy, one task per hand-off).
    """
    began = time.perf_counter()
    backend = _connect(engine, address, workers, initializer, initargs)
    try:
        cores = backend.capacity()
        slots = max(1, min(cores, workers or cores))
        _run_empty(backend, slots, address)
        start = time.perf_counter() - began
        count = max(MIN_HANDOFFS, min(MAX_HANDOFFS, HANDOFFS_PER_SLOT * slots))
        timed = time.perf_counter()
        _run_empty(backend, count, address)
        overhead = (time.perf_counter() - timed) / count
    except BaseException:
        backend.shutdown(cancel=True)
        raise
    return backend, Cluster(engine, address, cores=cores, overhead=overhead, start=start)


def _connect(
    engine: str,
    address: str,
    workers: int | None,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
) -> ClusterBackend:
    backend = create(
        engine, workers or 0, address=address, initializer=initializer, initargs=initargs
    )
    try:
        backend.start()
    except BaseException:
        backend.shutdown(cancel=True)
        raise
    return cast(ClusterBackend, backend)


def _run_empty(backend: ClusterBackend, count: int, address: str) -> None:
    """Run ``count`` empty tasks on the cluster, one per hand-off; raise the first failure."""
    lock = threading.Lock()
    left = [count]
    failed: list[BaseException] = []
    done = threading.Event()

    def sink(report: Done) -> None:
        if report.failures:
            pos, failure = next(iter(report.failures.items()))
            error = failure.exception(report.batch.indices[pos])
        else:
            error = None
        with lock:
            if error is not None:
                failed.append(error)
            left[0] -= 1
            if left[0] == 0 or error is not None:
                done.set()

    call = Call(_noop)
    for index in range(count):
        backend.submit(Batch(call, [index], [index]), sink)
    if not done.wait(PROBE_TIMEOUT):
        raise EscalaError(
            f"the {backend.engine} cluster at {address!r} did not run {count} empty tasks "
            f"within {PROBE_TIMEOUT:g} s while escala measured it: it may be out of workers "
            "or busy. Choose a mode yourself to run elsewhere."
        )
    if failed:
        raise failed[0]
