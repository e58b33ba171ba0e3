"""Running tasks inside a worker: the part every execution model shares.

A *worker* is whatever runs tasks one at a time: a worker process, a worker thread, the
caller's own thread in sequential mode. Each has a :class:`WorkerContext` holding its
per-worker state (what the initializer set up, ``escala.worker_state()``) and, for
coroutine functions, its own event loop, so that ``async def`` tasks run in every mode.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
import types
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from . import forks
from .messages import Apply, Batch, Call, invoke
from .slots import START, TASK, UNTRACKED

__all__ = ["WorkerContext", "worker_state"]

_state: contextvars.ContextVar[SimpleNamespace] = contextvars.ContextVar("escala_worker_state")


def worker_state() -> SimpleNamespace:
    """Return the state of the worker running the current task.

    Each worker (a process, a thread, or the caller in sequential mode) has its own
    namespace. Fill it in the ``initializer`` to open a connection once per worker, and
    read it in the task::

        def connect(dsn):
            escala.worker_state().db = open_db(dsn)

        def lookup(key):
            return escala.worker_state().db.get(key)

        escala.map(lookup, keys, mode="threads", initializer=connect, initargs=(dsn,))

    Raises:
        RuntimeError: called outside a task or initializer run by escala.
    """
    try:
        return _state.get()
    except LookupError:
        raise RuntimeError(
            "escala.worker_state() is only available inside a task or an initializer "
            "that escala runs"
        ) from None


class WorkerContext:
    """One worker's state, initializer and event loop.

    Args:
        initializer: run once, in the worker, before its first task.
        initargs: its arguments.
    """

    def __init__(
        self, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()
    ) -> None:
        self.state = SimpleNamespace()
        self._initializer = initializer
        self._initargs = initargs
        self._runner: asyncio.Runner | None = None

    def enter(self) -> contextvars.Token[SimpleNamespace]:
        """Make this worker's state current in the running thread."""
        return _state.set(self.state)

    def initialize(self) -> None:
        """Run the initializer (its exception propagates to the backend)."""
        if self._initializer is not None:
            self.resolve(self._initializer(*self._initargs))

    def call(self, call: Call, item: Any) -> Any:
        """Run one task and return its result."""
        return self.resolve(invoke(call, item))

    def resolve(self, result: Any) -> Any:
        """Run ``result`` to completion on this worker's loop if it is a coroutine."""
        if inspect.iscoroutine(result):
            if self._runner is None:
                self._runner = asyncio.Runner()
            return self._runner.run(result)
        return result

    def run_batch(
        self,
        batch: Batch,
        mark: Callable[[int], None] | None = None,
        slot: Any = None,
        slot_base: float = 0.0,
        timed: bool = False,
        ctrl_c: Callable[[BaseException], bool] | None = None,
    ) -> tuple[list[Any], dict[int, BaseException] | None, float]:
        """Run every task of ``batch`` in order.

        Whatever a task raises is its outcome, ``BaseException`` included: a
        ``KeyboardInterrupt``, ``SystemExit`` or ``GeneratorExit`` raised by a task is that
        task's failure, as ``concurrent.futures`` has it. A child that a task forked, and
        that returns from the task, ends here (:mod:`escala._worker.forks`).

        Args:
            batch: the tasks.
            mark: called with each task's position just before it starts.
            slot: the worker process's slot (:mod:`escala._worker.slots`), which receives
                ``slot_base + position`` before each task, or ``slot_base + UNTRACKED``
                once for a batch run without per-task tracking, and, when ``timed``, each
                task's start time. The parent reads it to tell which task a worker is on.
            slot_base: the batch's code in the slot, ``slots.base(batch_id)``.
            timed: track every task's start (for timeouts).
            ctrl_c: tells a real Ctrl-C, which propagates, from a task's own
                ``KeyboardInterrupt`` (:func:`escala._worker.interrupts.ctrl_c_check`).

        Returns:
            The results (``None`` where a task failed), the failures by position (or
            ``None``), and the seconds spent.
        """
        values: list[Any] = []
        failures: dict[int, BaseException] | None = None
        call = batch.call
        items = batch.items
        start = time.perf_counter()
        if call.apply is Apply.ONE and mark is None and not timed:
            # The common case is a bare loop: CPython 3.11 specialises the call and the
            # append, so it runs within a few ns of the builtin map (bench_fastpath.py);
            # per-task bookkeeping would cost 3-4 times the call of a trivial fn. Not map
            # itself: map ends quietly when the function raises StopIteration (next() on
            # an empty iterator), which would drop the rest of the batch; the loop lets it
            # out as it is. A task that raises appends nothing: its position is
            # len(values), the feed has moved past it, and no task runs twice.
            if slot is not None:
                slot[TASK] = slot_base + UNTRACKED
            fn = call.fn
            feed = iter(items)
            with forks.running(feed) as running:
                while len(values) < len(items):
                    try:
                        for item in feed:
                            values.append(fn(item))
                    except BaseException as exc:
                        if ctrl_c is not None and ctrl_c(exc):
                            raise
                        if failures is None:
                            failures = {}
                        failures[len(values)] = exc
                        values.append(None)
                    if running.forked:
                        forks.exit_child()
                if values and type(values[0]) is types.CoroutineType:
                    failures = self._await_all(values, failures, running, ctrl_c)
            return values, failures, time.perf_counter() - start
        is_coroutine = inspect.iscoroutine
        monotonic = time.monotonic
        with forks.running() as running:
            for pos, item in enumerate(items):
                if slot is not None:
                    if timed:
                        slot[START] = monotonic()  # first: see slots.read
                    slot[TASK] = slot_base + pos
                elif mark is not None:
                    mark(pos)
                try:
                    result = self.call(call, item)
                    if is_coroutine(result):
                        result = self.resolve(result)
                    values.append(result)
                except BaseException as exc:
                    if ctrl_c is not None and ctrl_c(exc):
                        raise
                    if failures is None:
                        failures = {}
                    failures[pos] = exc
                    values.append(None)
                if running.forked:
                    forks.exit_child()
        return values, failures, time.perf_counter() - start

    def _await_all(
        self,
        values: list[Any],
        failures: dict[int, BaseException] | None,
        running: forks.Running,
        ctrl_c: Callable[[BaseException], bool] | None,
    ) -> dict[int, BaseException] | None:
        """Run the coroutines an ``async def`` task returned, one by one, in place."""
        for pos, value in enumerate(values):
            if type(value) is types.CoroutineType:
                try:
                    values[pos] = self.resolve(value)
                except BaseException as exc:
                    if ctrl_c is not None and ctrl_c(exc):
                        raise
                    if failures is None:
                        failures = {}
                    failures[pos] = exc
                    values[pos] = None
                if running.forked:
                    forks.exit_child()
        return failures

    def close(self) -> None:
        """Close this worker's event loop, if it made one."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None
