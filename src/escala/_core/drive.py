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
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from .._errors import EscalaError
from .._worker.messages import Done
from ..backends.base import Backend
from .progress import NO_PROGRESS, Progress
from .scheduler import Scheduler

__all__ = ["Chunk", "adrive", "drive"]

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
    iterator = iter(items)
    clean = False
    try:
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
                clean = True
                return
            due = sched.next_due()
            _check_progress(sched, due)
            try:
                done = done_queue.get(
                    timeout=None if due is None else max(0.0, due - time.monotonic())
                )
            except queue.Empty:
                continue  # a retry is due
            sched.complete(done)
            while True:
                try:
                    sched.complete(done_queue.get_nowait())
                except queue.Empty:
                    break
    finally:
        progress.close()
        if owned:
            backend.shutdown(cancel=not clean)
        elif not clean:
            backend.cancel(sink)


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
                clean = True
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
    finally:
        progress.close()
        await _release(backend, owned=owned, clean=clean, sink=sink)


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
