"""Planning a run: which backend, how many workers, what scheduler; and assembling results.

Shared by the one-shot entry points (:mod:`escala._api`) and :class:`escala.Pool`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, replace
from typing import Any

from .._options import ENGINES, Options, needs_cluster_mode
from .._worker.cpu import usable_cpus
from .._worker.messages import Call
from ..backends import create
from ..backends.base import Backend
from .adaptive import ConcurrencyLimit
from .drive import Chunk
from .scheduler import BatchSizer, Scheduler, iteration_error, task_stop

#: Default concurrency of async mode when neither ``workers`` nor ``limit`` is given.
ASYNC_LIMIT = 100
#: The most worker processes or threads one run or pool may ask for: each process costs
#: tens of MB and a pid, each thread a stack; past this a typo (``workers=10**6``) would
#: exhaust the machine before the first task ran.
MAX_WORKERS = {"processes": 1024, "threads": 10_000}


def is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


@dataclass(frozen=True, slots=True)
class Plan:
    mode: str  # what the caller asked for (or the default)
    runs_on: str  # the backend that runs it: async mode sends plain functions to threads
    workers: int


def plan_for(fn: Callable[..., Any] | None, options: Options) -> Plan:
    coroutine = fn is not None and is_async(fn)
    if options.mode == "auto":
        raise ValueError(
            "mode='auto' measures a function on its items: it is for escala.map and "
            "escala.imap. A Pool keeps one kind of worker: choose its mode, or ask "
            "escala.advise(fn, items) which one suits your work."
        )
    mode = options.mode or ("async" if coroutine else "threads")
    if options.address is not None and mode not in ENGINES:
        raise needs_cluster_mode(options.mode)
    runs_on = "threads" if mode == "async" and fn is not None and not coroutine else mode
    if options.workers is not None:
        workers = options.workers
    elif mode == "processes":
        workers = usable_cpus()
    elif mode == "threads":
        workers = min(32, usable_cpus() + 4)
    elif mode == "async":
        workers = ASYNC_LIMIT
    elif mode in ("dask", "ray"):
        workers = 0  # the cluster's worker threads (or CPUs): the backend asks the cluster
    else:
        workers = 1
    most = MAX_WORKERS.get(runs_on)
    if most is not None and workers > most:
        kind = "processes" if runs_on == "processes" else "threads"
        raise ValueError(
            f"workers={workers:,} would start {workers:,} {kind}; at most {most:,} are allowed. "
            "CPU-bound work gains nothing past the usable cores "
            f"({usable_cpus()} here); for many waiting tasks use mode='async'"
        )
    return Plan(mode, runs_on, workers)


def fitted(plan: Plan, total: int | None) -> Plan:
    """Return ``plan`` with no more workers than the input has items (when it has a length).

    Workers beyond the item count would start, sit idle and stop: processes cost tens of
    milliseconds each to start, for nothing.
    """
    if total is None or plan.runs_on not in MAX_WORKERS or plan.workers <= max(1, total):
        return plan
    return replace(plan, workers=max(1, total))


def make_backend(plan: Plan, options: Options, **extra: Any) -> Backend:
    return create(
        plan.runs_on,
        plan.workers,
        initializer=options.initializer,
        initargs=options.initargs,
        start_method=options.start_method,
        address=options.address,
        **extra,
    )


def make_scheduler(
    call: Call,
    backend: Backend,
    options: Options,
    items: object,
    *,
    ordered: bool,
    plan: Plan,
    start: int = 1,
    keep_all: bool = False,
    limit: ConcurrencyLimit | None = None,
    offset: int = 0,
) -> Scheduler:
    """Return the scheduler for one run.

    ``keep_all`` says the caller keeps every result anyway (``map``, ``amap``): then the
    window may hold 4 batches per worker instead of 2, so workers never wait for the
    caller to take results, at no cost in memory that the result list does not already
    take.
    """
    sizer = BatchSizer(
        None if options.batch == "auto" else options.batch,
        adaptive=backend.batches_pay,
        workers=backend.workers,
        total=total_of(items),
        start=start,
    )
    return Scheduler(
        replace(call, timeout=options.timeout),
        workers=backend.workers,
        sizer=sizer,
        ordered=ordered,
        collect=options.errors == "collect",
        retry=options.retries,
        window=options.window,
        lookahead=1 if plan.runs_on == "sequential" else (4 if keep_all else 2),
        limit=limit,
        offset=offset,
    )


def check_arguments(fn: object, items: object, *, allow_async_items: bool = False) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if isinstance(items, Iterable) or (allow_async_items and isinstance(items, AsyncIterable)):
        return
    kind = "an iterable or an async iterable" if allow_async_items else "an iterable"
    raise TypeError(f"items must be {kind} (a list, a generator...), got {type(items).__name__}")


def total_of(items: object) -> int | None:
    return len(items) if isinstance(items, Sized) else None


def place(results: list[Any], chunk: Chunk) -> None:
    """Put a chunk of results at their input positions (chunks arrive in any order)."""
    indices, values = chunk
    if isinstance(indices, range):
        if indices.stop > len(results):
            results.extend([None] * (indices.stop - len(results)))
        results[indices.start : indices.stop] = values
        return
    for index, value in zip(indices, values, strict=True):
        if index >= len(results):
            results.extend([None] * (index + 1 - len(results)))
        results[index] = value


def collect(chunks: Iterator[Chunk]) -> list[Any]:
    """Gather a run's chunks into the list of results, in input order."""
    results: list[Any] = []
    try:
        for chunk in chunks:
            place(results, chunk)
    except RuntimeError as exc:
        stop = task_stop(exc)
        if stop is None:
            raise
    else:
        return results
    raise stop  # out of the handler: the generator's RuntimeError is no part of it


def values_of(chunks: Iterator[Chunk]) -> Iterator[Any]:
    """Yield a run's results one by one."""
    try:
        for _, values in chunks:
            yield from values
    except RuntimeError as exc:
        stop = task_stop(exc)
        if stop is None:
            raise
        raise iteration_error(stop) from stop
