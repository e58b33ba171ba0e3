"""Async mode: coroutine functions as tasks on one asyncio event loop.

Thousands of tasks that wait cost a few kilobytes each here, against a thread's stack and
a context switch. Concurrency is bounded by a semaphore of ``workers`` (``limit`` in
``amap``); a timeout cancels the task, which really stops it at its next ``await``.

The loop is the caller's own when the run is awaited (``amap``), or a private loop on a
thread named ``escala-async`` when a plain function asks for async mode (``map``, ``imap``,
``Pool``). Plain (non-async) functions never come here: the API sends them to threads.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from .._errors import BrokenWorker, PoolClosed, TaskTimeout
from .._worker import forks, interrupts
from .._worker.context import _state
from .._worker.messages import Batch, Call, Done, Failure, Sink, invoke

__all__ = ["AsyncBackend"]


class AsyncBackend:
    """Run coroutine tasks on an event loop, at most ``workers`` at once.

    Args:
        workers: most tasks awaiting at once.
        initializer: run once (it may be ``async``) before the first task.
        initargs: its arguments.
        loop: the running loop to use; ``None`` starts a private loop on its own thread.
    """

    batches_pay = False

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        loop: asyncio.AbstractEventLoop | None = None,
        **_: Any,
    ) -> None:
        self.workers = workers
        self._initializer = initializer
        self._initargs = initargs
        self._loop = loop
        self._own_loop = loop is None
        self._thread: threading.Thread | None = None
        self._context = contextvars.copy_context()
        self._context.run(_state.set, SimpleNamespace())
        self._sem: asyncio.Semaphore | None = None
        self._init: asyncio.Future[None] | None = None
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._closed = False
        self._ctrl_c = interrupts.Watch()

    def start(self) -> None:
        if not self._own_loop:
            self._ctrl_c.start()  # tasks run on the caller's thread, maybe the main one
        if self._own_loop:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._thread = threading.Thread(
                target=loop.run_forever, name="escala-async", daemon=True
            )
            self._thread.start()

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        if self._own_loop:
            self._loop.call_soon_threadsafe(fn, *args)
        else:
            fn(*args)

    def submit(self, batch: Batch, sink: Sink) -> None:
        if self._closed:
            raise PoolClosed()
        self._on_loop(self._spawn, batch, sink)

    def _spawn(self, batch: Batch, sink: Sink) -> None:
        if self._closed:
            return
        assert self._loop is not None
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.workers)
            self._init = self._loop.create_task(self._initialize(), context=self._context.copy())
        task = self._loop.create_task(self._run(batch, sink), context=self._context.copy())
        self._tasks[task] = id(sink)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _initialize(self) -> None:
        if self._initializer is None:
            return
        try:
            result = self._initializer(*self._initargs)
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:
            if _stops_the_run(exc, interrupts.ctrl_c_check()):
                raise
            raise BrokenWorker.initializer(f"{type(exc).__name__}: {exc}") from exc

    async def _run(self, batch: Batch, sink: Sink) -> None:
        assert self._init is not None and self._sem is not None
        try:
            if not self._init.done():
                await asyncio.shield(self._init)  # shield: one task's cancellation is not all's
            self._init.result()
        except BrokenWorker as exc:
            failure = Failure(error=exc)
            sink(
                Done(
                    batch,
                    [None] * len(batch.items),
                    dict.fromkeys(range(len(batch.items)), failure),
                )
            )
            return
        values: list[Any] = []
        failures: dict[int, Failure] | None = None
        running = forks.in_async_task()
        ctrl_c = interrupts.ctrl_c_check()
        busy = 0.0  # the tasks' own time: a wait for a free slot is not theirs
        for pos, item in enumerate(batch.items):
            async with self._sem:
                begin = time.perf_counter()
                try:
                    values.append(await self._call(batch, pos, item))
                except BaseException as exc:
                    if _stops_the_run(exc, ctrl_c):
                        raise
                    values.append(None)
                    if failures is None:
                        failures = {}
                    failures[pos] = Failure(error=exc)
                busy += time.perf_counter() - begin
            if running.forked:
                forks.exit_child()
        sink(Done(batch, values, failures, busy=busy))

    async def _call(self, batch: Batch, pos: int, item: Any) -> Any:
        timeout = batch.call.timeout
        if timeout is None:
            return await _invoke(batch.call, item)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await _invoke(batch.call, item)
        except TimeoutError:
            if not deadline.expired():
                raise  # the task's own TimeoutError, not ours
            raise TaskTimeout(
                batch.indices[pos], timeout, stopped=True, how="it was cancelled"
            ) from None

    def cancel(self, sink: Sink) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._on_loop(self._cancel_where, id(sink))

    def _cancel_where(self, sink_id: int | None) -> None:
        for task, owner in list(self._tasks.items()):
            if sink_id is None or owner == sink_id:
                task.cancel()

    def shutdown(self, *, cancel: bool) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is None:
            return
        if not self._own_loop:
            self._ctrl_c.stop()
            if cancel:
                self._cancel_where(None)
            return
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._finish(cancel), loop).result()
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join()
        loop.close()

    async def _finish(self, cancel: bool) -> None:
        """Last steps on the private loop's own thread (the caller may run a loop too)."""
        await self._drain(cancel)
        await asyncio.get_running_loop().shutdown_asyncgens()

    async def _drain(self, cancel: bool) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if self._init is not None:
            tasks.append(self._init)  # type: ignore[arg-type]
        if cancel:
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self, *, cancel: bool) -> None:
        if self._own_loop:
            # the private loop's thread is joined, which blocks: off the caller's loop
            await asyncio.to_thread(self.shutdown, cancel=cancel)
            return
        self.shutdown(cancel=cancel)
        await self._drain(cancel=False)  # on the caller's loop: wait for its tasks here


def _stops_the_run(exc: BaseException, ctrl_c: Callable[[BaseException], bool] | None) -> bool:
    """Whether ``exc`` stops the run rather than fail one task.

    A task's own exception, ``BaseException`` included, is its outcome; the run stops for
    a cancellation of escala's task (a cancelled run, the loop shutting down) and for a
    real Ctrl-C on the main thread. A ``CancelledError`` the task raised by itself, with
    nobody cancelling, is the task's.
    """
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0
    return ctrl_c is not None and ctrl_c(exc)


async def _invoke(call: Call, item: Any) -> Any:
    result = invoke(call, item)
    if inspect.isawaitable(result):
        return await result
    return result
