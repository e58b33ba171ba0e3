"""Sequential mode: every task runs in the caller's thread, one after another.

The baseline every other mode is measured against, and the right choice for tasks that
cost less than handing them to a worker. A task here cannot be interrupted by a timeout
(it *is* the caller): one that overruns is reported as timed out when it returns, and its
result is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .._errors import BrokenWorker, PoolClosed, TaskTimeout
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

    def start(self) -> None:
        token = self._ctx.enter()
        try:
            self._ctx.initialize()
        except Exception as exc:
            raise BrokenWorker(f"the initializer failed: {type(exc).__name__}: {exc}") from exc
        finally:
            _state.reset(token)

    def submit(self, batch: Batch, sink: Sink) -> None:
        if self._closed:
            raise PoolClosed("this pool is shut down; create a new one")
        starts: list[float] = []
        token = self._ctx.enter()
        try:
            values, errors, busy = self._ctx.run_batch(
                batch, (lambda _pos: starts.append(time.monotonic())) if batch.timeout else None
            )
        finally:
            _state.reset(token)
        failures = {pos: Failure(error=exc) for pos, exc in errors.items()} if errors else None
        if batch.timeout is not None:
            starts.append(time.monotonic())
            for pos in range(len(batch.items)):
                took = starts[pos + 1] - starts[pos]
                if took > batch.timeout and (failures is None or pos not in failures):
                    failures = failures or {}
                    failures[pos] = Failure(error=_overran(batch, pos, took))
        sink(Done(batch, values, failures, busy=busy))

    def cancel(self, sink: Sink) -> None:
        """Nothing is ever queued here."""

    def shutdown(self, *, cancel: bool) -> None:
        self._closed = True
        self._ctx.close()


def _overran(batch: Batch, pos: int, took: float) -> TaskTimeout:
    index = batch.indices[pos]
    assert batch.timeout is not None
    return TaskTimeout(
        f"task #{index} took {took:.3g}s, past its {batch.timeout:g}s timeout. In sequential "
        "mode the task runs in your own thread and cannot be interrupted, so its result was "
        "dropped when it returned; use mode='processes' to stop runaway tasks.",
        index=index,
        timeout=batch.timeout,
        stopped=False,
    )
