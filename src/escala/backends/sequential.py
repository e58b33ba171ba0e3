"""Sequential mode: every task runs in the caller's thread, one after another.

The baseline every other mode is measured against, and the right choice for tasks that
cost less than handing them to a worker. A task here cannot be interrupted by a timeout
(it *is* the caller): one that overruns is reported as timed out when it returns, and its
result is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from .._errors import BrokenWorker, PoolClosed, TaskTimeout
from .._worker import interrupts
from .._worker.context import WorkerContext, _state
from .._worker.messages import Batch, Done, Failure, Sink

__all__ = ["SequentialBackend"]


class SequentialBackend:
    """Run each batch inline, in the thread that submits it."""

    # Each batch costs a trip through the scheduler (a few µs): sized batches pay even here.
    batches_pay = True

    def __init__(
        self,
        workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        **_: Any,
    ) -> None:
        self.workers = 1
        self._ctx = WorkerContext(initializer, initargs)
        self._closed = False
        self._ctrl_c = interrupts.Watch()

    def start(self) -> None:
        # Tasks run in the caller's thread, the main one often: a real Ctrl-C there must
        # stop the run, a KeyboardInterrupt that a task raises must not
        self._ctrl_c.start()
        ctrl_c = interrupts.ctrl_c_check()
        token = self._ctx.enter()
        try:
            self._ctx.initialize()
        except BaseException as exc:
            if ctrl_c is not None and ctrl_c(exc):
                self._ctrl_c.stop()
                raise
            raise BrokenWorker.initializer(f"{type(exc).__name__}: {exc}") from exc
        finally:
            _state.reset(token)

    def submit(self, batch: Batch, sink: Sink) -> None:
        if self._closed:
            raise PoolClosed()
        timeout = batch.call.timeout
        starts: list[float] = []
        token = self._ctx.enter()
        try:
            values, errors, busy = self._ctx.run_batch(
                batch,
                (lambda _pos: starts.append(time.monotonic())) if timeout else None,
                ctrl_c=interrupts.ctrl_c_check(),
            )
        finally:
            _state.reset(token)
        failures = {pos: Failure(error=exc) for pos, exc in errors.items()} if errors else None
        if timeout is not None:
            starts.append(time.monotonic())
            for pos in range(len(batch.items)):
                took = starts[pos + 1] - starts[pos]
                if took > timeout and (failures is None or pos not in failures):
                    failures = failures or {}
                    failures[pos] = Failure(error=_overran(batch.indices[pos], timeout, took))
        sink(Done(batch, values, failures, busy=busy))

    def cancel(self, sink: Sink) -> None:
        """Nothing is ever queued here."""

    def shutdown(self, *, cancel: bool) -> None:
        self._closed = True
        self._ctrl_c.stop()
        self._ctx.close()

    async def aclose(self, *, cancel: bool) -> None:
        # closing the worker's own event loop runs it: not on the caller's loop
        await asyncio.to_thread(self.shutdown, cancel=cancel)


def _overran(index: int, timeout: float, took: float) -> TaskTimeout:
    return TaskTimeout(
        index,
        timeout,
        stopped=False,
        took=took,
        how="in sequential mode the task runs in your own thread and cannot be interrupted, "
        "so its result was dropped when it returned",
    )
