"""The advisor's vocabulary and constants: why a mode is chosen, and the figures the rules use.

A module of its own so that the rules (``_decide``), what they produce (``_advice``) and the
words that explain it (``_explain``) all read the same names without importing each other.
"""

from __future__ import annotations

import enum

__all__ = [
    "ASSUMED_ITEMS",
    "BATCH_TARGET",
    "CLUSTER_GAIN",
    "GUESSED_PROCESS_START",
    "GUESSED_PROCESS_TASK",
    "GUESSED_THREAD_TASK",
    "MAX_BATCH",
    "MIN_GAIN",
    "PICKLE_RATE",
    "THREADS_CAP",
    "TINY_JOB",
    "WATCH_LIMIT",
    "WATCH_STEP",
    "Reason",
]


class Reason(enum.Enum):
    """Why a mode was chosen; each has its own sentence in :meth:`Advice.explain`."""

    COROUTINE = "coroutine"  # fn is async: its waits overlap on one event loop
    HINT_IO = "hint-io"  # @escala.task(kind="io")
    HINT_CPU = "hint-cpu"  # @escala.task(kind="cpu")
    WAITS = "waits"  # CPU time a small share of wall time: I/O-bound
    RELEASES_GIL = "releases-gil"  # CPU-bound, but two threads ran at once
    HOLDS_GIL = "holds-gil"  # CPU-bound Python holding the GIL: processes
    TOO_SMALL = "too-small"  # the whole job costs less than handing it off
    ONE_CORE = "one-core"  # CPU-bound and only one usable core
    NOT_PICKLABLE = "not-picklable"  # would be processes, but cannot be sent
    ALL_SAMPLED = "all-sampled"  # the sampling ran every item already
    CLUSTER = "cluster"  # the cluster given by address= pays for what a task costs there


#: The most threads advised for waiting work (the adaptive limit may move within it).
THREADS_CAP = 256
#: A parallel mode must promise at least this much of a gain over sequential.
MIN_GAIN = 1.1
#: Batches are sized to about this much work (the scheduler's BatchSizer.TARGET).
BATCH_TARGET = 0.02
#: Pickling throughput assumed for moving arguments and results (bytes per second).
PICKLE_RATE = 500e6
#: A whole job shorter than this runs sequentially without measuring any hand-off: no
#: worker starts faster.
TINY_JOB = 0.005
#: Items assumed when the input has no length.
ASSUMED_ITEMS = 10_000
#: The cluster must promise to finish this many times sooner than this machine's best mode:
#: its figures come from a few empty tasks, and a shared cluster's load changes.
CLUSTER_GAIN = 1.25
#: The most tasks per hand-off (the scheduler's BatchSizer.CAP).
MAX_BATCH = 16384
#: A first task still computing when the sampling window closes is watched, and the
#: decision taken again, every WATCH_STEP seconds, for at most WATCH_LIMIT times what
#: starting processes costs: by then processes would have paid for themselves many times.
WATCH_STEP = 0.002
WATCH_LIMIT = 4.0
#: What starting worker processes, a task in them, and a task on threads are taken to
#: cost where they are not measured (a process's first auto call, when its decision does
#: not hinge on them; or processes the rules never came near): cautious, 2-10 times what they
#: measure on a 2-core machine (10 ms, 1-2 µs, 25-50 µs; a fresh interpreter's first pool
#: 30 ms), so that a guess never tips a decision towards them.
GUESSED_PROCESS_START = 0.05
GUESSED_PROCESS_TASK = 2e-5
GUESSED_THREAD_TASK = 1e-4
