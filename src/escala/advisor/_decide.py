"""The decision: from what was measured to a mode, a number of workers and a batch size.

The rules, in order (each is a :class:`Reason`):

1. a coroutine function runs on asyncio;
2. a hint (``@escala.task(kind=...)``) decides without measuring;
3. nothing left after sampling: done;
4. work that mostly waits (CPU under half of wall time) runs on threads, as many as keep
   the cores busy while the others wait: cores × (1 + wait / compute), capped;
5. computing work that lets other threads run (GIL released, or no GIL at all) runs on one
   thread per core;
6. computing Python that holds the GIL runs in processes, batched so that hand-offs stay a
   small part of the work, unless there is one core, or it cannot be pickled;
7. whenever the predicted time of the chosen mode, hand-offs included, is not clearly below
   sequential (tiny tasks, or too few of them), sequential wins; a whole job under
   ``TINY_JOB`` does not even measure what a hand-off costs;
8. with ``address=``, the cluster's prediction for the remaining items (:func:`decide_cluster`)
   is weighed against the mode chosen above, and wins only by ``CLUSTER_GAIN``.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .._core.adaptive import ASYNC_START
from ._advice import Advice, Cluster, Measurements
from ._rules import (
    ASSUMED_ITEMS,
    BATCH_TARGET,
    CLUSTER_GAIN,
    GUESSED_PROCESS_START,
    GUESSED_PROCESS_TASK,
    MAX_BATCH,
    MIN_GAIN,
    THREADS_CAP,
    TINY_JOB,
    Reason,
)

__all__ = [
    "THREADS_CAP",
    "alternatives",
    "decide",
    "decide_cluster",
    "decide_for_coroutine",
    "decide_from_hint",
]


def decide_for_coroutine(workers: int | None, total: int | None = None) -> Advice:
    """Coroutine functions run on asyncio, no measuring needed; unless the caller fixes
    how many at once, they start at ``ASYNC_START`` (at most ``total``, the input's
    length when known) and the run adapts the limit."""
    if workers is not None:
        return Advice("async", workers, 1, float(workers), Reason.COROUTINE)
    start = max(1, min(ASYNC_START, total)) if total is not None else ASYNC_START
    return Advice("async", start, 1, float(start), Reason.COROUTINE, adaptive=True)


def decide_from_hint(kind: str, cores: int, picklable: bool) -> Advice:
    """A ``kind`` hint decides without measuring."""
    if kind == "io":
        return Advice("threads", 4 * cores, 1, float(cores), Reason.HINT_IO, adaptive=True)
    if not picklable or cores < 2:
        return Advice("sequential", 1, "auto", 1.0, Reason.HINT_CPU)
    return Advice("processes", cores, "auto", float(cores), Reason.HINT_CPU)


def decide(m: Measurements, remaining: int | None) -> Advice:
    """Choose the mode for the ``remaining`` items (``None``: unknown, assumed many).

    Args:
        m: the measurements.
        remaining: items still to run after sampling.

    Returns:
        The advice, with its expected speed-up over sequential for the remaining items.
    """
    if remaining == 0:
        return Advice("sequential", 1, 1, 1.0, Reason.ALL_SAMPLED, m)
    wall = max(m.wall, 1e-9)
    # a subprocess's computing counts: the threads that wait for it share the cores it
    # runs on; time queued for a core is not waiting on I/O
    compute = max(m.computing, 1e-9)
    wait = m.waiting
    n = remaining if remaining is not None else ASSUMED_ITEMS  # unknown length: assume many
    sequential = n * wall
    if remaining is not None and sequential < TINY_JOB:
        return Advice("sequential", 1, "auto", 1.0, Reason.TOO_SMALL, m)

    if m.cpu_share < 0.5:
        workers = _thread_count(m.cores, wait, compute, n)
        reason = Reason.WAITS
        adaptive = True
    elif m.gil_held is False or m.free_threaded:
        workers = min(m.cores, n) if wait < compute else _thread_count(m.cores, wait, compute, n)
        reason = Reason.RELEASES_GIL
        adaptive = False
    else:
        return _processes(m, n, sequential)
    speedup = _threads_speedup(m, n, workers)
    if speedup < MIN_GAIN:
        return Advice("sequential", 1, "auto", 1.0, Reason.TOO_SMALL, m)
    return Advice("threads", workers, 1, speedup, reason, m, adaptive=adaptive)


def _threads_speedup(m: Measurements, n: int, workers: int) -> float:
    """Threads overlap waits; holding the GIL, their computing still runs one at a time
    (``n × cpu`` at least), and without it one per core (``n × cpu / cores``)."""
    wall = max(m.wall, 1e-9)
    gil_free = m.gil_held is False or m.free_threaded
    computing = n * min(m.cpu, wall) / (m.cores if gil_free else 1)
    computing += n * min(m.child_cpu, wall) / m.cores  # subprocesses, one per core at most
    threads_time = max(n * wall / workers, computing) + n * m.overhead.get("threads-task", 0.0)
    return n * wall / threads_time


def _thread_count(cores: int, wait: float, compute: float, n: int) -> int:
    return max(1, min(THREADS_CAP, n, round(cores * (1 + wait / compute))))


def _processes(m: Measurements, n: int, sequential: float) -> Advice:
    if m.cores < 2:
        return Advice("sequential", 1, "auto", 1.0, Reason.ONE_CORE, m)
    if not m.picklable:
        return Advice("sequential", 1, "auto", 1.0, Reason.NOT_PICKLABLE, m)
    workers = min(m.cores, n)
    # The work spreads over the workers, with unpickling the item and pickling the
    # result; pickling items and unpickling results happens in the caller's process,
    # one after another, whatever the number of workers.
    serial = m.overhead.get("processes-task", 0.0) + m.moving / 2
    spread = (m.wall + m.moving / 2) / workers
    predicted = m.overhead.get("processes-start", 0.0) + n * (spread + serial)
    if m.lower_bound:
        # The first task is still computing on the probe thread, holding the GIL: the
        # rest would wait for it in this process, and run beside it in processes. It has
        # run m.wall so far, so each task takes at least that; of what it has left
        # nothing is known, and as much again is the usual guess for a task seen only
        # running (half way through, on average over the moment it is looked at).
        sequential += m.wall
        predicted = max(m.wall, predicted)
    speedup = sequential / predicted if predicted > 0 else 1.0
    if (workers < 2 and not m.lower_bound) or speedup < MIN_GAIN:
        return Advice("sequential", 1, "auto", 1.0, Reason.TOO_SMALL, m)
    batch = max(1, min(16384, math.floor(BATCH_TARGET / max(m.wall, 1e-9))))
    return Advice("processes", workers, batch, speedup, Reason.HOLDS_GIL, m)


def alternatives(
    m: Measurements, remaining: int | None, workers: int | None = None
) -> dict[str, tuple[int, float]]:
    """What each local mode would give for the ``remaining`` items, whichever is chosen.

    :func:`decide` picks one mode by rules; when the run finds that mode short of its
    promise, it needs the others' promises from the same figures to know what is worth
    trying. Each is ``(workers, speed-up over sequential)``:

    - threads as :func:`_threads_speedup` says;
    - processes run one task each, computing or waiting, after they start, with sending
      and receiving done in this process one after another;
    - sequential is 1 by definition.

    Args:
        m: the measurements (the freshest: the run re-reads them).
        remaining: items still to run (``None``: unknown, assumed many).
        workers: the caller's choice of concurrency, which every mode keeps.
    """
    n = remaining if remaining is not None else ASSUMED_ITEMS
    wall = max(m.wall, 1e-9)
    compute = max(m.computing, 1e-9)
    wait = m.waiting
    sequential = n * wall
    found = {"sequential": (1, 1.0)}
    if n <= 0:
        return found
    threads = workers or (
        _thread_count(m.cores, wait, compute, n) if wait >= compute else min(m.cores, n)
    )
    found["threads"] = (threads, _threads_speedup(m, n, threads))
    if m.picklable and m.cores > 1:
        procs = workers or min(m.cores, n)
        # unmeasured when the rules never came near processes: a prior, which a trial
        # replaces with what the run measures
        per_task = m.overhead.get("processes-task", GUESSED_PROCESS_TASK)
        start = m.overhead.get("processes-start", GUESSED_PROCESS_START)
        spread = (wall + m.moving / 2) / procs
        predicted = start + n * (spread + per_task + m.moving / 2)
        found["processes"] = (procs, sequential / predicted)
    return found


def decide_cluster(
    local: Advice, cluster: Cluster, remaining: int | None, workers: int | None = None
) -> Advice:
    """Weigh the cluster named by ``address=`` against this machine's best mode.

    For the ``remaining`` items (``None``: unknown, assumed many), with ``n`` of them, each
    taking ``wall`` seconds as measured here, ``slots = min(cores, workers, n)`` and batches
    sized as the run would size them::

        cluster = start + n × wall / slots + ⌈n / batch⌉ × overhead + n × moving
        local   = n × wall / (the local advice's speed-up over sequential)

    The cluster is chosen when ``local ≥ CLUSTER_GAIN × cluster`` and the work can be
    pickled. Hand-offs are counted in full, as if none overlapped with the work: where the
    estimate errs, it errs towards this machine.

    Args:
        local: the advice for this machine (from :func:`decide` and the caller's workers).
        cluster: the cluster's measured figures (``cores``, ``overhead``, ``start``).
        remaining: items still to run after sampling.
        workers: the caller's cap on tasks at once, if any.

    Returns:
        ``local`` with the weighed cluster attached, or advice to run on the cluster.
    """
    m = local.measured
    if m is None or remaining == 0 or local.reason is Reason.ALL_SAMPLED or not cluster.reached:
        return replace(local, cluster=replace(cluster, cores=0))  # not weighed
    n = remaining if remaining is not None else ASSUMED_ITEMS
    wall = max(m.wall, 1e-9)
    slots = max(1, min(cluster.cores, workers or cluster.cores, n))
    # as the scheduler's BatchSizer sizes them: about BATCH_TARGET of work, 4 per slot at least
    batch = max(1, min(MAX_BATCH, math.floor(BATCH_TARGET / wall), math.ceil(n / (4 * slots))))
    work = n * wall / slots
    predicted = cluster.start + work + math.ceil(n / batch) * cluster.overhead + n * m.moving
    local_time = n * wall / max(local.speedup, 1e-9)
    weighed = replace(
        cluster,
        batch=batch,
        predicted=predicted,
        work=work,
        local=local_time,
        local_mode=local.mode,
        remaining=n,
    )
    if not m.picklable or local_time < CLUSTER_GAIN * predicted:
        return replace(local, cluster=weighed)
    speedup = n * wall / predicted
    return Advice(cluster.engine, slots, batch, speedup, Reason.CLUSTER, m, cluster=weighed)
