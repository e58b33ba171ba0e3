"""The scheduler: input window, batching, retries, ordering and error policy, without I/O.

The scheduler is a plain object that the sync and async drivers feed with events (items
pulled, batches done, time passing) and ask for decisions (how many items to pull, which
batches to send, which results are ready). It never blocks, sleeps or touches a thread, so
both drivers share it and tests can drive it step by step::

    items ──pull──▶ driver ──take()──▶ Scheduler ──batches──▶ driver ──submit──▶ backend
                      ▲                   │  ▲                                     │
       results ◀──pop_ready()─────────────┘  └──────────── complete(Done) ◀────────┘

Memory is bounded by the *window*: tasks pulled from the input and not yet handed back to
the caller (running, waiting for a retry, or buffered behind a slower task for ordered
output). When it is full, the driver stops pulling, so an endless generator is consumed
only as fast as results are taken.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .._options import Retry
from .._worker.messages import Batch, Call, Done
from .adaptive import ConcurrencyLimit

__all__ = ["BatchSizer", "Outcome", "Scheduler"]

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Outcome(Generic[R]):
    """What became of one item, when errors are collected (``errors="collect"``).

    Attributes:
        index: the item's position in the input.
        item: the item itself.
        value: the result, when the task succeeded.
        error: the exception, when it failed for good.
        attempts: how many times the task ran.
    """

    index: int
    item: Any
    value: R | None
    error: BaseException | None
    attempts: int

    @property
    def ok(self) -> bool:
        """Whether the task succeeded."""
        return self.error is None

    def unwrap(self) -> R:
        """Return the value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class BatchSizer:
    """Choose how many tasks to send to a worker at once.

    Fixed when the caller says so. Otherwise, where batching pays (worker processes), it
    starts with single tasks and sizes batches from measured worker time so that each takes
    about ``TARGET`` seconds, the way joblib's auto batching does: long tasks go one by one
    (best balance), trivial ones go by thousands (IPC paid once per batch). Growth from one
    measurement is limited so that one unusually fast sample cannot make a huge batch.
    """

    TARGET = 0.02
    GROWTH = 16
    CAP = 16384

    def __init__(
        self,
        fixed: int | None,
        *,
        adaptive: bool,
        workers: int,
        total: int | None,
        start: int = 1,
    ):
        self.adaptive = adaptive and fixed is None
        self.cap = self.CAP
        self._total = total
        self._spread = 4 * workers
        if total is not None:
            # Leave enough batches to keep every worker busy until the end, as Pool.map does.
            self.cap = max(1, min(self.cap, math.ceil(total / self._spread)))
        self.size = fixed or (min(max(1, start), self.cap) if self.adaptive else 1)

    def size_at(self, pulled: int) -> int:
        """The batch size for the next items, once ``pulled`` items have been pulled.

        Batches shrink as the end of an input of known length nears (at most a
        ``4 × workers``-th of what is left, as OpenMP's guided schedule does): the last
        batches are then short, and a worker that drew long tasks there holds up the end
        of the run for less time.
        """
        if not self.adaptive or self._total is None:
            return self.size
        return max(1, min(self.size, math.ceil((self._total - pulled) / self._spread)))

    def observe(self, tasks: int, busy: float) -> None:
        """Learn from a batch of ``tasks`` that kept a worker busy ``busy`` seconds."""
        if not self.adaptive or tasks <= 0 or busy <= 0:
            return  # no measurement: a batch cut short by a death or a timeout
        per_task = busy / tasks
        ideal = int(self.TARGET / per_task)
        # A small batch (the end of the input, a retry) may show that batches should
        # shrink, but it is too small a sample to grow them from: growth is limited to
        # GROWTH × the tasks measured, and never below the current size.
        self.size = max(1, min(ideal, self.cap, max(self.size, tasks * self.GROWTH)))


class Scheduler:
    """Decide what to pull, what to send and what to hand back, for one run.

    Args:
        call: the function and how to apply it.
        workers: tasks the backend runs at once.
        sizer: the batch sizer.
        ordered: hand results back in input order.
        collect: hand back an :class:`Outcome` per item instead of raising the first error.
        retry: the retry policy.
        window: most tasks outstanding; ``None`` is ``lookahead × workers × batch size``.
        lookahead: batches per worker kept in flight so no worker waits for the next.
        limit: an adaptive concurrency limit; when given, it is the window (in batches).
        offset: the input position of the first item this run pulls (a run that goes on
            where another left off, as ``mode="auto"`` does when it moves).
        clock: monotonic time source.
        rand: uniform random source in [0, 1), for retry jitter.
    """

    def __init__(
        self,
        call: Call,
        *,
        workers: int,
        sizer: BatchSizer,
        ordered: bool,
        collect: bool,
        retry: Retry,
        window: int | None = None,
        lookahead: int = 2,
        limit: ConcurrencyLimit | None = None,
        offset: int = 0,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._call = call
        self._workers = workers
        self.sizer = sizer
        self._ordered = ordered
        self._collect = collect
        self._retry = retry
        self._window = window
        self.lookahead = lookahead  # may change while running: the window follows
        self.limit = limit
        self._clock = clock
        self._rand = rand

        self._next_index = offset
        self._offset = offset
        self._input_done = False
        self._outstanding = 0  # pulled, not yet handed back
        self._in_flight = 0  # batches submitted, not yet done
        self._attempts: dict[int, int] = {}  # index -> runs so far, only for tasks that failed
        self._waiting: list[
            tuple[float, int, int, Any, bool]
        ] = []  # (due, seq, index, item, alone)
        self._seq = itertools.count()
        self._ready: deque[tuple[Sequence[int], list[Any]]] = deque()  # (indices, results)
        self._ready_count = 0
        self._reorder: dict[int, list[Any]] = {}  # first index -> consecutive entries
        self._next_emit = offset
        self.error: BaseException | None = None
        self.batches_sent = 0
        self.ran = 0  # tasks that ran to an outcome (attempts: a retried task counts again)
        self.busy = 0.0  # seconds workers reported busy on them

    # -- input side -----------------------------------------------------------------

    @property
    def window(self) -> int:
        """The most tasks outstanding at once."""
        if self._window is not None:
            return self._window
        if self.limit is not None:
            return self.limit.value * self.sizer.size
        return self.lookahead * self._workers * self.sizer.size

    def room(self) -> int:
        """Return how many more items the driver may pull now."""
        if self._input_done or self.error is not None:
            return 0
        return max(0, self.window - self._outstanding)

    def wanted(self) -> int:
        """Return how many items to pull now: a whole batch, or nothing until one fits.

        Cutting a batch to whatever room is left makes runs of odd small batches, each a
        round trip to a worker; while results are still to come back, waiting for a whole
        batch's room costs nothing. (A window set smaller than two batches is taken as
        given.)
        """
        room = self.room()
        size = self.sizer.size_at(self._next_index - self._offset)
        if room < size and self._outstanding and self.window >= 2 * size:
            return 0
        return min(room, size)

    @property
    def pulled(self) -> int:
        """The input position after the last item pulled (``offset`` + items pulled)."""
        return self._next_index

    def take(self, items: list[Any], *, whole: bool = False) -> list[Batch]:
        """Accept items just pulled from the input; return the batches to send.

        Args:
            items: the items, in input order.
            whole: make them one batch whatever the batch size (items already run or
                running elsewhere, such as the ones sampled by ``mode="auto"``).
        """
        start = self._next_index
        self._next_index += len(items)
        self._outstanding += len(items)
        size = len(items) if whole else self.sizer.size_at(start - self._offset)
        batches = [
            Batch(self._call, range(start + i, start + i + len(chunk)), chunk)
            for i in range(0, len(items), size)
            for chunk in (items[i : i + size],)
        ]
        self._in_flight += len(batches)
        self.batches_sent += len(batches)
        return batches

    def end_input(self) -> None:
        """Note that the input is exhausted."""
        self._input_done = True

    @property
    def input_done(self) -> bool:
        """Whether the input is exhausted."""
        return self._input_done

    # -- retries --------------------------------------------------------------------

    def due(self, now: float) -> list[Batch]:
        """Return batches of tasks whose retry time has come."""
        if not self._waiting or self._waiting[0][0] > now or self.error is not None:
            return []
        batches: list[Batch] = []
        group_idx: list[int] = []
        group_items: list[Any] = []
        while self._waiting and self._waiting[0][0] <= now:
            _, _, index, item, alone = heapq.heappop(self._waiting)
            if alone:
                batches.append(Batch(self._call, [index], [item]))
            else:
                group_idx.append(index)
                group_items.append(item)
        size = self.sizer.size
        for i in range(0, len(group_idx), size):
            batches.append(Batch(self._call, group_idx[i : i + size], group_items[i : i + size]))
        self._in_flight += len(batches)
        self.batches_sent += len(batches)
        return batches

    def next_due(self) -> float | None:
        """Return when the next retry is due, or ``None``."""
        return self._waiting[0][0] if self._waiting else None

    def _later(self, due: float, index: int, item: Any, alone: bool = False) -> None:
        heapq.heappush(self._waiting, (due, next(self._seq), index, item, alone))

    # -- completions ----------------------------------------------------------------

    def complete(self, done: Done) -> None:
        """Take in a finished batch: keep results, schedule retries, note failures."""
        self._in_flight -= 1
        batch = done.batch
        lost = done.lost
        ran = len(batch.items) - len(lost)
        self.ran += ran
        self.busy += done.busy
        self.sizer.observe(ran, done.busy)
        if self.limit is not None and ran > 0:
            failed = len(done.failures) if done.failures else 0
            self.limit.record(ran, failed, done.busy / ran, self._clock())
        if self.error is not None:
            return  # failing fast: nothing more is handed back
        failures = done.failures
        if not failures and not lost and not self._collect and not self._attempts:
            self._accept_chunk(batch.indices, done.values)
            return
        now = self._clock()
        lost_set = set(lost)
        for pos, index in enumerate(batch.indices):
            item = batch.items[pos]
            if pos in lost_set:
                self._later(now, index, item, alone=done.split)
                continue
            attempts = self._attempts.pop(index, 0) + 1
            failure = failures.get(pos) if failures else None
            if failure is None:
                value = done.values[pos]
                if self._collect:
                    value = Outcome(index, item, value, None, attempts)
                self._accept_chunk(range(index, index + 1), [value])
                continue
            error = failure.exception(index)
            if self._retry.should_retry(error, attempts):
                self._attempts[index] = attempts
                self._later(now + self._retry.delay(attempts, self._rand), index, item)
            elif self._collect:
                self._accept_chunk(
                    range(index, index + 1), [Outcome(index, item, None, error, attempts)]
                )
            else:
                mark_stop(error, index)
                self.error = error
                return

    def _accept_chunk(self, indices: Sequence[int], values: list[Any]) -> None:
        if not self._ordered:
            self._hand_back(indices, values)
            return
        if not isinstance(indices, range):  # a regrouped retry batch: indices not consecutive
            for index, value in zip(indices, values, strict=True):
                self._accept_chunk(range(index, index + 1), [value])
            return
        if indices.start != self._next_emit:
            self._reorder[indices.start] = values
            return
        self._hand_back(indices, values)
        self._next_emit = indices.stop
        while (chunk := self._reorder.pop(self._next_emit, None)) is not None:
            start = self._next_emit
            self._hand_back(range(start, start + len(chunk)), chunk)
            self._next_emit += len(chunk)

    def _hand_back(self, indices: Sequence[int], values: list[Any]) -> None:
        self._ready.append((indices, values))
        self._ready_count += len(values)

    # -- output side ----------------------------------------------------------------

    def pop_ready(self) -> list[tuple[Sequence[int], list[Any]]]:
        """Return the results ready to hand back, as ``(indices, results)`` chunks.

        Chunks come in the order to hand them back (input order when ``ordered``). With
        ``collect``, each result is an :class:`Outcome`. Results travel in chunks, not one
        by one, because per-item overhead in the caller dominates trivial tasks.

        Raises:
            BaseException: the first task failure, when errors are not collected.
        """
        if self.error is not None:
            raise self.error
        if not self._ready:
            return []
        ready = list(self._ready)
        self._ready.clear()
        self._outstanding -= self._ready_count
        self._ready_count = 0
        return ready

    @property
    def outstanding(self) -> int:
        """Tasks pulled from the input and not yet handed back."""
        return self._outstanding

    @property
    def finished(self) -> bool:
        """Whether every item has been pulled, run and handed back."""
        return self._input_done and self._outstanding == 0 and not self._ready

    @property
    def in_flight(self) -> int:
        """Batches submitted and not yet reported."""
        return self._in_flight


def mark_stop(error: BaseException, index: int) -> None:
    """Mark a task's ``StopIteration`` about to be raised through the run's generators.

    Python turns a ``StopIteration`` raised in a generator into ``RuntimeError('generator
    raised StopIteration')`` (PEP 479), and the driver is a generator; the mark tells the
    conversion of *this* exception from a task's own RuntimeError (:func:`task_stop`).
    """
    if isinstance(error, (StopIteration, StopAsyncIteration)):
        error._escala_task = index  # type: ignore[union-attr]


def task_stop(exc: BaseException) -> StopIteration | StopAsyncIteration | None:
    """The task's ``StopIteration`` that a generator of the run turned into ``exc``, if so."""
    cause = exc.__cause__
    if (
        type(exc) is RuntimeError
        and isinstance(cause, (StopIteration, StopAsyncIteration))
        and hasattr(cause, "_escala_task")
    ):
        return cause
    return None


def iteration_error(
    stop: StopIteration | StopAsyncIteration, where: str = "an iterator of results"
) -> RuntimeError:
    """What ``where`` raises for a task's ``StopIteration``, which it cannot raise as it is.

    Raised from an iterator, it would end the caller's ``for`` loop as if every result were
    in; from a coroutine, Python itself refuses it (PEP 479).
    """
    name = type(stop).__name__
    return RuntimeError(
        f"task #{getattr(stop, '_escala_task', '?')} raised {name}, which {where} cannot "
        f"raise as it is (a loop over it would end as if the input were done): the {name} "
        "is the cause of this error"
    )
