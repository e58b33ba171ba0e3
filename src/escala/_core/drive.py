"""The two drivers: thin loops that move events between the scheduler and a backend.

The sync driver blocks on a queue in the caller's thread (``map``, ``imap``, ``Pool``); the
async driver awaits an ``asyncio.Queue`` on the caller's loop (``amap``). Everything else
they share lives in the sans-I/O :class:`~escala._core.scheduler.Scheduler`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

from .._errors import EscalaError
from .._worker.messages import Done
from ..backends.base import Backend
from .progress import NO_PROGRESS, Progress
from .scheduler import Scheduler

__all__ = ["Chunk", "adrive", "drive", "heeding_signals"]

T = TypeVar("T")

#: The longest the caller's thread blocks in one wait. The kernel may hand a Ctrl-C to any
#: thread of the process; Python's handler then only sets a flag, which the main thread
#: reads when it next runs Python code. A wait with no end would never read it (seen: one
#: Ctrl-C in about fifteen lost on a busy machine, the run waiting forever on its tasks).
WAIT_SLICE = 0.1

#: Results travel from the scheduler to the caller as (input positions, results) chunks.
Chunk = tuple[Sequence[int], list[Any]]


def drive(
    backend: Backend,
    sched: Scheduler,
    items: Iterable[Any],
    *,
    owned: bool,
    progress: Progress = NO_PROGRESS,
    done_queue: queue.SimpleQueue[Done] | None = None,
) -> Iterator[Chunk]:
    """Run a whole input through ``backend``, yielding ``(indices, results)`` chunks.

    Args:
        backend: a started backend.
        sched: a fresh scheduler for this run.
        items: the input; pulled lazily, as the window allows.
        owned: the run owns the backend (shut it down at the end) rather than sharing
            a pool's (cancel only this run's queued work).
        progress: the progress bar to advance.
        done_queue: where completions arrive, when others than ``backend`` report too
            (the tasks that ``mode="auto"`` was still sampling when it decided).
    """
    if done_queue is None:
        done_queue = queue.SimpleQueue()
    sink = done_queue.put
    clean = False
    try:
        # The loop lives in its own frame: see _pump for why.
        yield from _pump(backend, sched, iter(items), progress, done_queue)
        clean = True
    finally:
        progress.close()
        if owned:
            backend.shutdown(cancel=not clean)
        elif not clean:
            backend.cancel(sink)


def _pump(
    backend: Backend,
    sched: Scheduler,
    iterator: Iterator[Any],
    progress: Progress,
    done_queue: queue.SimpleQueue[Done],
) -> Iterator[Chunk]:
    """Move events between ``sched`` and ``backend`` until the run is finished.

    Apart from :func:`drive`'s ``try``/``finally`` on purpose: CPython 3.11 and 3.12 look
    up the handler of an exception raised at a loop's back jump (a Ctrl-C that reached
    another thread first is raised there) at the instruction *before* the loop's head,
    which is outside a ``try`` whose body starts with the loop (CPython gh-108214). The
    ``finally`` was skipped and the workers went on. An exception that leaves this frame
    is met in the caller's at the ``yield from``, where the lookup is right.
    """
    sink = done_queue.put
    while True:
        _feed(iterator, sched, backend, sink)
        for batch in sched.due(time.monotonic()):
            backend.submit(batch, sink)
        ready = sched.pop_ready()
        if ready:
            progress.advance(sum(len(values) for _, values in ready))
            yield from ready
            continue
        if sched.finished:
            return
        due = sched.next_due()
        _check_progress(sched, due)
        wait = WAIT_SLICE if due is None else min(WAIT_SLICE, due - time.monotonic())
        try:
            done = done_queue.get(timeout=max(0.0, wait))
        except queue.Empty:
            continue  # a retry is due, or a slice of the wait has passed
        sched.complete(done)
        while True:
            try:
                sched.complete(done_queue.get_nowait())
            except queue.Empty:
                break


def _feed(iterator: Iterator[Any], sched: Scheduler, backend: Backend, sink: Any) -> None:
    while (want := sched.wanted()) > 0:
        chunk = list(islice(iterator, want))
        if len(chunk) < want:
            sched.end_input()
        if chunk:
            for batch in sched.take(chunk):
                backend.submit(batch, sink)


async def adrive(
    backend: Backend,
    sched: Scheduler,
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    owned: bool,
    progress: Progress = NO_PROGRESS,
) -> AsyncIterator[Chunk]:
    """The async twin of :func:`drive`: same scheduler, an ``asyncio.Queue`` for completions.

    ``items`` may be an async iterable. Completions from other threads (worker threads, the
    process manager) come back to this loop through ``call_soon_threadsafe``.
    """
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    done_queue: asyncio.Queue[Done] = asyncio.Queue()

    def sink(done: Done) -> None:
        if threading.get_ident() == loop_thread:
            done_queue.put_nowait(done)
        else:
            try:
                loop.call_soon_threadsafe(done_queue.put_nowait, done)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting for this any more

    if isinstance(items, AsyncIterable):
        source: AsyncIterator[Any] | None = aiter(items)
        iterator: Iterator[Any] | None = None
    else:
        source, iterator = None, iter(items)
    clean = False
    try:
        # in a frame of its own, for the reason _pump gives
        async for chunk in _apump(backend, sched, iterator, source, progress, done_queue, sink):
            yield chunk
        clean = True
    finally:
        progress.close()
        await _release(backend, owned=owned, clean=clean, sink=sink)


async def _apump(
    backend: Backend,
    sched: Scheduler,
    iterator: Iterator[Any] | None,
    source: AsyncIterator[Any] | None,
    progress: Progress,
    done_queue: asyncio.Queue[Done],
    sink: Any,
) -> AsyncIterator[Chunk]:
    """The loop of :func:`adrive`, as :func:`_pump` is :func:`drive`'s."""
    while True:
        if iterator is not None:
            _feed(iterator, sched, backend, sink)
        elif source is not None:
            await _afeed(source, sched, backend, sink)
        for batch in sched.due(time.monotonic()):
            backend.submit(batch, sink)
        ready = sched.pop_ready()
        if ready:
            progress.advance(sum(len(values) for _, values in ready))
            for chunk in ready:
                yield chunk
            continue
        if sched.finished:
            return
        due = sched.next_due()
        _check_progress(sched, due)
        if due is None:
            done = await done_queue.get()
        else:
            try:
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    done = await done_queue.get()
            except TimeoutError:
                continue
        sched.complete(done)
        while not done_queue.empty():
            sched.complete(done_queue.get_nowait())


async def heeding_signals(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` on a loop that wakes at least every :data:`WAIT_SLICE`.

    For a loop run by ``asyncio.run`` on the main thread: a Ctrl-C the kernel handed to
    another thread only sets Python's flag, and a loop asleep in ``select`` until its next
    timer (an hour away, for a task that sleeps an hour) would not read it until then.
    """

    async def tick() -> None:
        while True:
            await asyncio.sleep(WAIT_SLICE)

    ticker = asyncio.ensure_future(tick())
    try:
        return await awaitable
    finally:
        ticker.cancel()


def _check_progress(sched: Scheduler, due: float | None) -> None:
    """Fail loudly, rather than wait forever, if nothing could ever complete the run."""
    if sched.in_flight == 0 and due is None and sched.outstanding:
        raise EscalaError(
            f"escala lost track of {sched.outstanding} task(s): nothing is running or "
            "waiting to run, but they were never handed back. This is a bug in escala; "
            "please report it with the mode and options used."
        )


async def _afeed(source: AsyncIterator[Any], sched: Scheduler, backend: Backend, sink: Any) -> None:
    while (want := sched.wanted()) > 0:
        chunk: list[Any] = []
        async for item in source:
            chunk.append(item)
            if len(chunk) == want:
                break
        if len(chunk) < want:
            sched.end_input()
        if chunk:
            for batch in sched.take(chunk):
                backend.submit(batch, sink)


async def _release(backend: Backend, *, owned: bool, clean: bool, sink: Any) -> None:
    if not owned:
        if not clean:
            backend.cancel(sink)
        return
    await backend.aclose(cancel=not clean)
