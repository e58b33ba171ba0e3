"""The messages of a run: the function and how to apply it, batches of tasks, and reports.

A backend runs *batches*: a function, how to apply it, and a few items. It reports each
finished batch to the batch's *sink* (a thread-safe callable) as a :class:`Done`::

    driver ── submit(batch, sink) ──▶ backend ── runs fn on workers ──▶ sink(Done)
       ▲                                                                   │
       └──────────────────────── completions ◀─────────────────────────────┘

A batch whose worker died or ran out of time reports the task it was running as failed
and the tasks it never reached (or whose results died with the worker) as ``lost``; the
scheduler sends those again without counting an attempt.

These classes live below the backends (in ``_worker``) because a worker process runs the
same ``Call`` and reports the same ``Failure`` as the parent does.
"""

from __future__ import annotations

import enum
import itertools
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import EscalaError, RemoteError, RemoteTraceback

__all__ = ["Apply", "Batch", "Call", "Done", "Failure", "Sink", "describe_items", "invoke"]


class Apply(enum.IntEnum):
    """How a task's item becomes the function's arguments."""

    ONE = 0  # fn(item): map, imap, amap
    STAR = 1  # fn(*item): starmap-style
    CALL = 2  # fn(*item[0], **item[1]): Pool.submit


@dataclass(frozen=True, slots=True, eq=False)
class Call:
    """What every task of a run shares: the function, how to apply it, and its time limit.

    Attributes:
        fn: the function.
        apply: how a task's item becomes the function's arguments.
        timeout: seconds each task may run, or ``None``: a constant of the run, so it lives
            here rather than on every batch.
    """

    fn: Callable[..., Any]
    apply: Apply = Apply.ONE
    timeout: float | None = None


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
        id: unique within this process.
    """

    call: Call
    indices: Sequence[int]
    items: list[Any]
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
            self.error = self._rebuild(index)
        elif index is not None:
            _name_task(self.error, index)
        return self.error

    def _rebuild(self, index: int | None) -> BaseException:
        """Rebuild a worker's exception in the caller, the worker's traceback as its cause."""
        task = "a task" if index is None else f"task #{index}"
        exc: BaseException | None = None
        if self.payload is not None:
            try:
                exc = pickle.loads(self.payload)
            except Exception as why:
                self.message += (
                    f" [it could not be rebuilt in the caller: {type(why).__name__}: {why}]"
                )
        if exc is None:
            exc = RemoteError(
                f"{task} raised {self.type_name}: {self.message}",
                index=index,
                type_name=self.type_name,
            )
        exc.__cause__ = RemoteTraceback(self.traceback)
        if self.where:
            exc.add_note(f"escala: raised by {task} in {self.where}")
        return exc


def _name_task(exc: BaseException, index: int) -> None:
    """Note which task raised an exception of the task's own (escala's name it already)."""
    if isinstance(exc, EscalaError):
        return
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list) and any(str(n).startswith("escala: raised by") for n in notes):
        return  # a task that raises the same object each time, or a retried one
    try:
        exc.add_note(f"escala: raised by task #{index}")
    except TypeError:  # its __notes__ is not a list: leave it as the task made it
        pass


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


def describe_items(batch: Batch, positions: Sequence[int]) -> str:
    """Name tasks for an error message: ``"#3"`` or ``"#3, #4 and 2 more"``."""
    names = [f"#{batch.indices[p]}" for p in positions[:2]]
    more = len(positions) - len(names)
    return ", ".join(names) + (f" and {more} more" if more else "")
