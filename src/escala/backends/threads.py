"""Threads mode: a pool of daemon threads, for work that waits (network, disk, databases).

Threads share the caller's memory, so nothing is pickled and any function works. While one
thread waits on I/O (or inside native code that releases the GIL), the others run.

Why not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined when the
interpreter exits, so one task that never returns blocks exit forever, and it has no way to
give up on a task. Here the threads are daemons, and a task that runs past its timeout is
*abandoned*: it fails with :class:`~escala.TaskTimeout` at once, a fresh thread takes its
place, and the old thread finishes in the background (Python cannot stop a thread)::

    submit ──▶ work queue ──▶ worker threads (started on demand, up to `workers`)
                                   │  current task + start time
                                   ▼
                        watchdog thread (only when a timeout is set):
                        abandons overrunning workers, reports the timeout
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._errors import BrokenWorker, PoolClosed, TaskTimeout
from .._worker import forks
from .._worker.context import WorkerContext
from .._worker.messages import Batch, Done, Failure, Sink

__all__ = ["ThreadBackend"]


@dataclass(eq=False)
class _Running:
    """The batch a worker thread is on, shared with the watchdog (under the lock)."""

    batch: Batch
    sink: Sink
    values: list[Any] = field(default_factory=list)
    failures: dict[int, Failure] | None = None
    pos: int = 0
    started: float = 0.0


@dataclass(eq=False)
class _Worker:
    thread: threading.Thread | None = None
    running: _Running | None = None
    abandoned: bool = False


class ThreadBackend:
    """Run batches on up to ``workers`` daemon threads.

    Args:
        workers: most threads at once (abandoned threads are not counted).
        initializer: run once in each thread before its first task.
        initargs: its arguments.
    """

    batches_pay = False

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        name: str = "escala-thread",
        **_: Any,
    ) -> None:
        self.workers = workers
        self._initializer = initializer
        self._initargs = initargs
        self._name = name
        self._work: queue.SimpleQueue[tuple[Batch, Sink] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake_watchdog = threading.Condition(self._lock)
        self._started_all = threading.Condition(self._lock)
        self._live: set[_Worker] = set()
        self._idle = threading.Semaphore(0)
        # Sinks whose queued batches are to be skipped, kept by id *with* the sink: holding
        # the object keeps its id from being reused by a new sink while it is listed.
        self._cancelled: dict[int, Sink] = {}
        self._closed = False
        self._broken: BaseException | None = None
        self._watchdog: threading.Thread | None = None
        self._count = 0
        self._wanted = 0  # threads asked for and not yet started
        self._starters = 0  # threads (the caller's included) busy starting others

    def start(self) -> None:
        """Threads start on demand, at submit."""

    def submit(self, batch: Batch, sink: Sink) -> None:
        if self._closed:
            raise PoolClosed()
        if batch.call.timeout is not None and self._watchdog is None:
            with self._lock:
                if self._watchdog is None:
                    self._watchdog = threading.Thread(
                        target=self._watch, name=f"{self._name}-watchdog", daemon=True
                    )
                    self._watchdog.start()
        self._work.put((batch, sink))
        if not self._idle.acquire(blocking=False):
            self._want_thread()

    def _want_thread(self) -> None:
        """Ask for one more worker thread, if the pool may grow."""
        with self._lock:
            if self._closed or len(self._live) + self._wanted >= self.workers:
                return
            self._wanted += 1
            if self._starters:
                return  # a thread busy starting others will start this one too
            self._starters += 1
        self._start_threads()

    def _start_threads(self) -> None:
        """Start the threads asked for; each new thread joins in before its first task.

        ``Thread.start`` waits until the new thread runs, about 0.1 ms. Started one by one
        from the submitting thread, a thousand threads cost the caller 0.1 s before the last
        task begins; started by the threads themselves, the number of starters doubles at
        each step and the caller goes back to submitting at once.
        """
        try:
            while True:
                with self._lock:
                    if self._wanted == 0 or self._closed:
                        return
                    self._wanted -= 1
                    self._starters += 1  # the new thread starts others before serving
                    worker = _Worker()
                    self._count += 1
                    worker.thread = threading.Thread(
                        target=self._serve,
                        args=(worker,),
                        name=f"{self._name}-{self._count}",
                        daemon=True,
                    )
                    self._live.add(worker)
                try:
                    worker.thread.start()
                except BaseException:
                    # interrupted (Ctrl-C) while starting: count it out if it never ran
                    if worker.thread.ident is None:
                        with self._lock:
                            self._live.discard(worker)
                            self._starters -= 1
                    raise
        finally:
            with self._lock:
                self._starters -= 1
                if not self._starters:
                    self._started_all.notify_all()

    def _serve(self, worker: _Worker) -> None:
        self._start_threads()
        ctx = WorkerContext(self._initializer, self._initargs)
        ctx.enter()
        try:
            try:
                ctx.initialize()
            except BaseException as exc:  # the thread lives on to report it, or none would
                self._broken = BrokenWorker.initializer(
                    f"{type(exc).__name__}: {exc}", where="a worker thread"
                )
                self._broken.__cause__ = exc
            while True:
                job = self._work.get()
                if job is None:
                    return
                batch, sink = job
                if self._cancelled and self._work.empty():
                    # nothing queued behind this job: no other can belong to a cancelled sink
                    with self._lock:
                        skip = id(sink) in self._cancelled
                        self._cancelled.clear()
                else:
                    skip = id(sink) in self._cancelled
                if skip:
                    pass
                elif self._broken is not None:
                    error = Failure(error=self._broken)
                    sink(
                        Done(
                            batch,
                            [None] * len(batch.items),
                            dict.fromkeys(range(len(batch.items)), error),
                        )
                    )
                else:
                    self._execute(worker, ctx, batch, sink)
                    if worker.abandoned:
                        return
                self._idle.release()
        finally:
            ctx.close()
            with self._lock:
                self._live.discard(worker)

    def _execute(self, worker: _Worker, ctx: WorkerContext, batch: Batch, sink: Sink) -> None:
        run = _Running(batch, sink, started=time.monotonic())
        with self._lock:
            worker.running = run
        timed = batch.call.timeout is not None
        begin = time.perf_counter()
        with forks.running() as running:
            for pos, item in enumerate(batch.items):
                if timed:
                    with self._lock:
                        run.pos, run.started = pos, time.monotonic()
                        self._wake_watchdog.notify()
                try:
                    value = ctx.call(batch.call, item)
                except BaseException as exc:  # all of it: SIGINT never reaches this thread
                    value = None
                    if run.failures is None:
                        run.failures = {}
                    run.failures[pos] = Failure(error=exc)
                if running.forked:
                    forks.exit_child()
                if timed:
                    with self._lock:
                        if worker.abandoned:
                            return  # the watchdog has reported this batch already
                        run.values.append(value)
                else:
                    run.values.append(value)
        with self._lock:
            if worker.abandoned:
                return
            worker.running = None
        sink(Done(batch, run.values, run.failures, busy=time.perf_counter() - begin))

    def _watch(self) -> None:
        """Abandon workers whose current task ran past its timeout."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                wake: float | None = None
                reports: list[tuple[Sink, Done]] = []
                for worker in list(self._live):
                    run = worker.running
                    if run is None or run.batch.call.timeout is None:
                        continue
                    deadline = run.started + run.batch.call.timeout
                    if deadline <= now:
                        reports.append(self._abandon(worker))
                    elif wake is None or deadline < wake:
                        wake = deadline
                if reports:
                    # Report and replace without the lock: a sink may run a future's
                    # callbacks, and starting a thread waits for it.
                    self._lock.release()
                    try:
                        for sink, done in reports:
                            sink(done)
                            self._want_thread()
                    finally:
                        self._lock.acquire()
                    continue
                self._wake_watchdog.wait(None if wake is None else wake - now)

    def _abandon(self, worker: _Worker) -> tuple[Sink, Done]:
        """Give up on a worker's overrunning task and replace the worker (lock held)."""
        run = worker.running
        assert run is not None
        timeout = run.batch.call.timeout
        assert timeout is not None
        worker.abandoned = True
        self._live.discard(worker)
        batch, pos = run.batch, run.pos
        failures = dict(run.failures or {})
        failures[pos] = Failure(
            error=TaskTimeout(
                batch.indices[pos],
                timeout,
                stopped=False,
                how="a thread cannot be stopped from outside in Python, so escala stopped "
                "waiting for it: it goes on in the background until the function returns, "
                "and a new thread took its place",
            )
        )
        values = run.values + [None] * (len(batch.items) - len(run.values))
        lost = list(range(pos + 1, len(batch.items)))
        return run.sink, Done(batch, values, failures, lost)

    def cancel(self, sink: Sink) -> None:
        with self._lock:
            self._cancelled[id(sink)] = sink

    def shutdown(self, *, cancel: bool) -> None:
        with self._lock:
            self._closed = True
            self._wake_watchdog.notify_all()
            # every thread registered must have started before it can be told to stop;
            # starting takes a fraction of a millisecond, the limit is only a backstop
            self._started_all.wait_for(lambda: not self._starters, timeout=5)
            live = list(self._live)
        if cancel:
            while True:
                try:
                    self._work.get_nowait()
                except queue.Empty:
                    break
        for _ in live:
            self._work.put(None)
        for worker in live:
            busy = worker.running is not None
            thread = worker.thread
            if thread is not None and thread.ident is not None and not (cancel and busy):
                thread.join()
        if self._watchdog is not None:
            self._watchdog.join()

    async def aclose(self, *, cancel: bool) -> None:
        # joining the worker threads blocks: off the caller's loop
        await asyncio.to_thread(self.shutdown, cancel=cancel)
