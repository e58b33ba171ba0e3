"""The typed messages between escala and its workers' processes: one class per kind.

Processes mode sends them over each worker's pipe; the cluster engines (Dask, Ray) get the
replies back as the result of their remote task::

    parent                                     worker process
      │ ── Run (batch id, fn, items) ─────────▶ │ runs the tasks in order
      │ ◀──────────── Ran (values, failures) ── │   or, when the batch did not load:
      │ ◀───────────────── Unloadable (why) ── │
      │ ── Stop ──────────────────────────────▶ │ exits
      │ ◀──────── Ready / InitFailed (once) ── │ after the initializer, at start-up

    cluster backend                            remote task (escala's batch runner)
      │ ── the task's arguments ──────────────▶ │
      │ ◀────── Ran / Unloadable / InitFailed ── │

A module of its own, not :mod:`.messages`: those classes are the vocabulary of a run
inside one process (a ``Batch`` holds live items, a ``Done`` live values, and neither
crosses a process boundary as such); these hold what does cross, already pickled, and both
ends of every pipe read them. A worker process imports this module and what it needs to
run tasks, nothing of the parent's machinery.

Why ``NamedTuple`` and not a frozen, slotted dataclass: a ``Run`` and a ``Ran`` are pickled
once per batch, on the manager thread too, the hot path of processes mode. Measured on
Python 3.11 (pickle, then unpickle, a ``Run`` of 16 items and its ``Ran``), the manager's
share costs 7 µs as tuples of a kind code and fields (the old wire), 8 µs as named tuples
and 11 µs as dataclasses, whose ``__getstate__``/``__setstate__`` run in Python; end to
end, ``batch=1`` with 2 workers, best of 6 runs: 83 µs a task with tuples, 83 with named
tuples, 95 (+14 %) with dataclasses. A named tuple pickles as its class and a tuple, has
named, typed, read-only fields, and no ``__dict__``. Tell messages apart by type
(``match``/``isinstance``), never with ``==``: as tuples, ``Stop() == Ready()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .messages import Apply, Failure

__all__ = ["FromWorker", "InitFailed", "Ran", "Ready", "Reply", "Run", "Stop", "Unloadable"]


class Run(NamedTuple):
    """Parent to worker process: run one batch.

    Attributes:
        batch_id: the batch's id, which the worker writes into its slot.
        fn_id: the function's number in this parent; the worker keeps it decoded by it.
        fn: the cloudpickled function, or ``None`` when the worker already has ``fn_id``.
        apply: how a task's item becomes the function's arguments.
        forget: drop every function kept so far first (the parent reset its cache).
        timed: write each task's start time into the slot (the run has a timeout).
        indices: each task's position in the run's input.
        items: the pickled list of the tasks' items.
    """

    batch_id: int
    fn_id: int
    fn: bytes | None
    apply: Apply
    forget: bool
    timed: bool
    indices: Sequence[int]
    items: bytes


class Stop(NamedTuple):
    """Parent to worker process: exit now (the worker is idle)."""


class Ready(NamedTuple):
    """Worker process to parent: initialized, waiting for work."""


class InitFailed(NamedTuple):
    """Worker to parent: the initializer raised; no task runs there.

    Attributes:
        failure: what it raised, with the worker's traceback.
    """

    failure: Failure


class Unloadable(NamedTuple):
    """Worker to parent: the batch's function or items could not be loaded there.

    Attributes:
        failure: the exception that loading raised, with the worker's traceback.
    """

    failure: Failure


class Ran(NamedTuple):
    """Worker to parent: the batch ran.

    Attributes:
        values: the pickled list of results, ``None`` where a task failed.
        failures: the failed tasks by position in the batch, or ``None``.
        busy: seconds the worker spent running the batch.
    """

    values: bytes
    failures: dict[int, Failure] | None
    busy: float


#: What a batch's runner answers, in a worker process or a cluster task.
Reply = Ran | Unloadable | InitFailed
#: Everything a worker process sends its parent.
FromWorker = Ready | Ran | Unloadable | InitFailed
