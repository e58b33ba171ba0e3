"""The slot: where a worker process shows which task it is on, without sending a message.

Each worker process of processes mode shares two doubles with its parent. The worker
writes them before each task (``WorkerContext.run_batch``); the parent's manager thread
reads them to time that task out, or to blame it when the worker dies::

    cells[TASK]   batch_id * SPAN + position    the task running now; position UNTRACKED
                                                means "somewhere in this batch" (the fast
                                                path, which does not track each task)
    cells[START]  time.monotonic() at its start  only for batches with a timeout; the
                                                same clock in every process

START is written before TASK, so a reader that sees the same TASK before and after reading
START has a consistent pair (:func:`read`). A double holds integers exactly up to 2**53,
which leaves 33 bits for the batch id: 8 billion batches per process.

A batch must hold fewer than ``UNTRACKED`` tasks, so that every position fits in its
``POSITION_BITS`` and none reads as UNTRACKED; ``escala._options`` caps ``batch`` below
it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "POSITION_BITS",
    "SIZE",
    "SPAN",
    "START",
    "TASK",
    "UNTRACKED",
    "allocate",
    "base",
    "read",
    "view",
]

#: Index of the cell holding the running task's code (``base(batch_id) + position``).
TASK = 0
#: Index of the cell holding the running task's start time.
START = 1
#: Doubles in a slot.
SIZE = 2
#: Bits of the task code that hold the position in the batch.
POSITION_BITS = 20
#: Distinct positions: batch ids step by this much.
SPAN = 1 << POSITION_BITS
#: The position written once for a batch run without tracking each task.
UNTRACKED = SPAN - 1


def allocate(ctx: Any) -> Any:
    """Return a new slot in shared memory, from a ``multiprocessing`` context."""
    return ctx.RawArray("d", SIZE)


def view(slot: Any) -> memoryview[float]:
    """Return the slot's cells as a memoryview of doubles (faster than the ctypes array)."""
    return memoryview(slot).cast("B").cast("d")


def base(batch_id: int) -> float:
    """Return the task code of position 0 of a batch; position ``p`` is ``base + p``."""
    return float(batch_id * SPAN)


def read(cells: memoryview[float]) -> tuple[int, int | None, float]:
    """Read a slot that its worker may be writing.

    Returns:
        The batch id, the position in it (``None`` for UNTRACKED) and the start time.
    """
    while True:
        task, start = cells[TASK], cells[START]
        if cells[TASK] == task:
            break
    batch_id, pos = divmod(int(task), SPAN)
    return batch_id, (None if pos == UNTRACKED else pos), start
