"""The contract every execution model implements, and the messages that cross it.

A backend runs *batches*: a function, how to apply it, and a few items. It knows nothing of
input order, retries, error policy or progress; the scheduler above it owns those. It
reports each finished batch to the batch's *sink* (a thread-safe callable) as a
:class:`Done`::

    driver ── submit(batch, sink) ──▶ backend ── runs fn on workers ──▶ sink(Done)
       ▲                                                                   │
       └──────────────────────── completions ◀─────────────────────────────┘

A batch whose worker died or ran out of time reports the task it was running as failed
and the tasks it never reached (or whose results died with the worker) as ``lost``; the
scheduler sends those again without counting an attempt.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Apply",
    "Backend",
    "Batch",
    "Call",
    "ClusterBackend",
    "Done",
    "Failure",
    "Sink",
    "invoke",
]


class Apply(enum.IntEnum):
    """How a task's item becomes the function's arguments."""

    ONE = 0  # fn(item): map, imap, amap
    STAR = 1  # fn(*item): starmap-style
    CALL = 2  # fn(*item[0], **item[1]): Pool.submit


@dataclass(frozen=True, slots=True, eq=False)
class Call:
    """The function of a run and how to apply it; shared by all the run's batches."""

    fn: Callable[..., Any]
    apply: Apply = Apply.ONE


def invoke(call: Call, item: Any) -> Any:
    """Call ``call.fn`` on one task's item, as ``call.apply`` says."""
    if call.apply is Apply.ONE:
        return call.fn(item)
    if call.apply is Apply.STAR:
        return call.fn(*item)
    return call.fn(*item[0], **item[1])


_batch_ids = itertools.count(1)


@dataclass(slots=True, eq=False)
class Batch:
    """Tasks sent to one worker together.

    Attributes:
        call: the function and how to apply it.
        indices: each task's position in the run's input.
        items: each task's item, in the same order.
        timeout: seconds each task may run, or ``None``.
        id: unique within this process.
    """

    call: Call
    indices: Sequence[int]
    items: list[Any]
    timeout: float | None = None
    id: int = field(default_factory=lambda: next(_batch_ids))


@dataclass(slots=True, eq=False)
class Failure:
    """Why one task failed: a live exception, or one that still has to be rebuilt.

    Local backends hand over the exception itself. The process backend hands over the
    pickled exception and the worker's formatted traceback; :meth:`exception` rebuilds it
    in the caller, where a failure to unpickle can be reported instead of breaking the pool.
    """

    error: BaseException | None = None
    payload: bytes | None = None
    type_name: str = ""
    message: str = ""
    traceback: str = ""
    where: str = ""

    def exception(self, index: int | None) -> BaseException:
        """Return the exception to raise for the task at ``index``."""
        if self.error is None:
            from .._pickling import rebuild_exception

            self.error = rebuild_exception(self, index)
        return self.error


@dataclass(slots=True, eq=False)
class Done:
    """What a backend reports when a batch is finished, failed or cut short.

    Attributes:
        batch: the batch this reports on.
        values: one result per task; meaningless where the task failed or was lost.
        failures: failed tasks by position in the batch, or ``None`` when all succeeded.
        lost: positions of tasks that must be sent again (never started, or their result
            died with their worker).
        busy: seconds the worker spent on the batch (``0`` if unknown); sizes batches.
        split: send the lost tasks again one per batch (a batch failed as a whole, for
            example its items could not be loaded, and the culprit must be found).
    """

    batch: Batch
    values: list[Any]
    failures: dict[int, Failure] | None = None
    lost: list[int] = field(default_factory=list)
    busy: float = 0.0
    split: bool = False


Sink = Callable[[Done], None]


class Backend(Protocol):
    """One execution model. ``submit`` may be called from any thread."""

    #: how many tasks run at once
    workers: int
    #: whether measured batching pays here (True for processes: each hand-off costs IPC)
    batches_pay: bool

    def start(self) -> None:
        """Get the workers ready; called once before the first ``submit``."""

    def submit(self, batch: Batch, sink: Sink) -> None:
        """Queue ``batch``; report it to ``sink`` when done. Must not block for long.

        Raises:
            SendError: an item cannot be sent to a worker (the process backend checks this
                here, so the caller learns which item before any work is lost).
            PoolClosed: the backend has been shut down.
        """

    def cancel(self, sink: Sink) -> None:
        """Drop the queued batches reported to ``sink``; running ones finish unreported."""

    def shutdown(self, *, cancel: bool) -> None:
        """Stop the workers and wait for them.

        Args:
            cancel: stop running tasks too (kill worker processes, cancel coroutines); a
                running thread cannot be stopped and is left to finish on its own.
        """


class ClusterBackend(Backend, Protocol):
    """An execution model on an engine's cluster (Dask, Ray), which says how big it is."""

    #: the engine's name, as messages give it ("Dask", "Ray")
    engine: str

    def capacity(self) -> int:
        """Return how many tasks the cluster runs at once (its worker threads, or CPUs)."""


def describe_items(batch: Batch, positions: Sequence[int]) -> str:
    """Name tasks for an error message: ``"#3"`` or ``"#3, #4 and 2 more"``."""
    names = [f"#{batch.indices[p]}" for p in positions[:2]]
    more = len(positions) - len(names)
    return ", ".join(names) + (f" and {more} more" if more else "")
