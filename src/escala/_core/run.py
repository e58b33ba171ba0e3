"""``start_run``: the one place a run is assembled, whoever asks for it.

``map``, ``imap``, ``amap``, ``aimap``, ``Pool.map``, ``mode="auto"`` and the advisor's
measurements all run work the same way::

    fn, items, Options ──▶ start_run ──▶ Run(plan, backend, scheduler)
                                           │ chunks()  (sync driver, caller's thread)
                                           │ achunks() (async driver, caller's loop)
                                           ▼
                                   (input positions, results) chunks

A run either owns its backend (it starts it when driven and stops it at the end) or uses
a pool's (``shared``: it only cancels its own queued work when it ends early).
"""

from __future__ import annotations

import queue
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .._options import Options
from .._worker.messages import Call, Done
from ..backends.base import Backend
from .adaptive import ConcurrencyLimit
from .drive import Chunk, adrive, drive
from .plan import Plan, fitted, make_backend, make_scheduler, plan_for, total_of
from .progress import NO_PROGRESS, KeptOpen, Progress, progress_for
from .scheduler import Scheduler

__all__ = ["Run", "start_run"]


@dataclass(eq=False)
class Run:
    """One run, assembled and not yet driven.

    Attributes:
        plan: the mode asked for, the backend that runs it, how many workers.
        backend: the backend that runs the tasks.
        scheduler: the run's scheduler.
        options: the run's options.
        shared: the backend belongs to a pool: the run neither starts nor stops it.
        started: the backend is running already (a pool's, or one that measured a cluster).
        label: the mode as the progress bar names it.
        total: the input's length, when it has one.
        on_end: called with the run and the seconds it was driven, when driving ends
            (finished, failed or abandoned).
    """

    plan: Plan
    backend: Backend
    scheduler: Scheduler
    options: Options
    shared: bool
    started: bool
    label: str
    total: int | None
    on_end: Callable[[Run, float], None] | None = None

    def chunks(
        self,
        items: Iterable[Any],
        *,
        done_queue: queue.SimpleQueue[Done] | None = None,
        progress: Progress | None = None,
    ) -> Iterator[Chunk]:
        """Drive the run on this thread; yield ``(input positions, results)`` chunks.

        Args:
            items: the input (or what is left of it), pulled lazily.
            done_queue: where completions arrive, when others than the backend report too
                (the tasks that ``mode="auto"`` was still sampling when it decided).
            progress: a bar shared with other runs over the same input (``mode="auto"``
                when it moves), which this run advances and leaves open; by default the
                run draws its own, as ``options.progress`` asks.
        """
        own = self._ready(progress is None)
        began = time.perf_counter()
        try:
            yield from drive(
                self.backend,
                self.scheduler,
                items,
                owned=not self.shared,
                progress=own if progress is None else KeptOpen(progress),
                done_queue=done_queue,
            )
        finally:
            self._ended(began)

    async def achunks(self, items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Chunk]:
        """Drive the run on the running event loop; yield chunks as :meth:`chunks` does."""
        progress = self._ready()
        began = time.perf_counter()
        try:
            async for chunk in adrive(
                self.backend, self.scheduler, items, owned=not self.shared, progress=progress
            ):
                yield chunk
        finally:
            self._ended(began)

    def _ended(self, began: float) -> None:
        if self.on_end is not None:
            self.on_end(self, time.perf_counter() - began)

    def close(self) -> None:
        """Stop a backend the run owns and will never drive (it was given up before)."""
        if not self.shared:
            self.backend.shutdown(cancel=True)

    def _ready(self, progress: bool = True) -> Any:
        try:
            if not self.started:
                self.started = True
                self.backend.start()
            if not progress:
                return NO_PROGRESS
            return progress_for(self.options.progress, self.label, self.total)
        except BaseException:
            self.close()
            raise


def start_run(
    fn: Callable[..., Any],
    items: object,
    options: Options,
    *,
    ordered: bool,
    keep_all: bool = False,
    plan: Plan | None = None,
    backend: Backend | None = None,
    shared: bool = False,
    start: int = 1,
    limit: ConcurrencyLimit | None = None,
    label: str | None = None,
    offset: int = 0,
    **extra: Any,
) -> Run:
    """Assemble one run of ``fn`` over ``items``: plan, backend and scheduler.

    Args:
        fn: the task.
        items: the input; only its length (when it has one) is read here.
        options: the run's options, with a concrete mode (not ``"auto"``).
        ordered: hand results back in input order.
        keep_all: the caller keeps every result anyway (``map``, ``amap``): the window
            may then hold more batches per worker at no cost in memory.
        plan: the plan, when the caller has made it already.
        backend: a backend that is already started: a pool's (``shared``) or one that
            measured a cluster (the run owns it from here).
        shared: ``backend`` belongs to a pool.
        start: the batch size to start from (a pool remembers each function's).
        limit: an adaptive concurrency limit for the window (waiting work on threads).
        label: the mode as the progress bar names it (default: the plan's mode).
        offset: the input position of the first of ``items`` (a run that goes on where
            another left off); results and errors name positions in the whole input.
        **extra: passed to the backend's constructor (the async backend's ``loop``).
    """
    if plan is None:
        plan = plan_for(fn, options)
    given = backend is not None
    if not given:
        plan = fitted(plan, total_of(items))
    if backend is None:
        backend = make_backend(plan, options, **extra)
    try:
        scheduler = make_scheduler(
            Call(fn),
            backend,
            options,
            items,
            ordered=ordered,
            plan=plan,
            start=start,
            keep_all=keep_all,
            limit=limit,
            offset=offset,
        )
    except BaseException:
        if given and not shared:
            backend.shutdown(cancel=True)
        raise
    return Run(
        plan,
        backend,
        scheduler,
        options,
        shared=shared,
        started=given,
        label=label or plan.mode,
        total=total_of(items),
    )
