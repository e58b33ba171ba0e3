"""The one-shot entry points: options in, one backend chosen, results out.

``map``, ``imap``, ``amap`` and ``aimap`` only validate their arguments and have the run
assembled (:func:`escala._core.run.start_run`) and driven. They hold no execution logic of
their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, Literal, TypeVar, Unpack, overload

from ._auto import run_auto
from ._core.adaptive import ConcurrencyLimit, for_coroutines
from ._core.drive import Chunk, heeding_signals
from ._core.plan import (
    Plan,
    check_arguments,
    collect,
    is_async,
    place,
    plan_for,
    total_of,
    values_of,
)
from ._core.run import Run, start_run
from ._core.scheduler import Outcome, iteration_error, task_stop
from ._options import ErrorPolicy, Options, RunOptions
from .advisor import Advice, recorded
from .advisor._decide import decide_for_coroutine
from .advisor._verify import Leg

__all__ = ["aimap", "amap", "imap", "map"]

T = TypeVar("T")
R = TypeVar("R")


# -- map ------------------------------------------------------------------------------


@overload
def map(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    /,
    *,
    errors: Literal["raise"] = "raise",
    options: Options | None = None,
    **kwargs: Unpack[RunOptions],
) -> list[R]: ...
@overload
def map(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    errors: Literal["raise"] = "raise",
    options: Options | None = None,
    **kwargs: Unpack[RunOptions],
) -> list[R]: ...
@overload
def map(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    /,
    *,
    errors: Literal["collect"],
    options: Options | None = None,
    **kwargs: Unpack[RunOptions],
) -> list[Outcome[R]]: ...
@overload
def map(
    fn: Callable[[T], R],
    items: Iterable[T],
    /,
    *,
    errors: Literal["collect"],
    options: Options | None = None,
    **kwargs: Unpack[RunOptions],
) -> list[Outcome[R]]: ...
def map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    /,
    *,
    errors: ErrorPolicy = "raise",
    options: Options | None = None,
    **kwargs: Unpack[RunOptions],
) -> list[Any]:
    """Run ``fn`` on every item and return the results in input order.

    Returns exactly what ``[fn(x) for x in items]`` returns, in every mode; coroutine
    functions are awaited. By default the first task that fails raises its own exception
    here (the worker's traceback attached as ``__cause__``) and the rest is cancelled.

    Args:
        fn: the task; a plain or ``async`` function taking one item.
        items: any iterable, pulled lazily.
        errors: ``"raise"``, or ``"collect"`` for an :class:`Outcome` per item.
        options: an :class:`Options` to start from; keywords override it.
        **kwargs: ``mode``, ``workers``, ``timeout``, ``retries``, ``batch``, ``progress``,
            ``initializer``, ``initargs``, ``start_method``, ``window``, ``address`` (see
            :class:`Options`). With ``mode="auto"`` (the default) and an ``address``, the
            cluster is weighed against this machine and chosen only when it pays.

    Raises:
        TaskTimeout: a task ran past ``timeout``.
        WorkerDied: the worker process running a task died.
        SendError: an item, result or exception could not cross to or from a worker.
    """
    opts = _resolve(fn, Options.build(options, errors=errors, **kwargs))
    check_arguments(fn, items)
    if opts.mode == "auto":
        return collect(run_auto(fn, items, opts, ordered=False, keep_all=True))
    plan = plan_for(fn, opts)
    if plan.runs_on == "async" and not _loop_running():
        # No loop in this thread: run one here, as amap would, rather than start a thread
        # for it (a few milliseconds a call, and one more thread to stop on Ctrl-C).
        try:
            return asyncio.run(heeding_signals(_amap_collect(fn, items, opts)))
        except RuntimeError as exc:
            stop = task_stop(exc)
            if stop is None:
                raise
        raise stop  # what a task raised, out of the handler (see collect)
    run = _start(fn, items, opts, ordered=False, keep_all=True, plan=plan)
    return collect(run.chunks(items))


def _resolve(fn: Callable[..., Any], opts: Options) -> Options:
    """The default mode is auto; for a coroutine function, auto is async at once."""
    if opts.mode in (None, "auto"):
        if is_async(fn):
            # a coroutine function runs on this machine's event loop: nothing is measured,
            # so a cluster named by address= is not weighed; mode None is the default's
            # async, whose limit escala adapts (see _start)
            return replace(opts, mode=None, address=None)
        return replace(opts, mode="auto")
    return opts


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def imap(
    fn: Callable[[T], R] | Callable[[T], Awaitable[R]],
    items: Iterable[T],
    /,
    *,
    ordered: bool = True,
    errors: ErrorPolicy = "raise",
    options: Options | None = None,
    **kwargs: Unpack[RunOptions],
) -> Iterator[Any]:
    """Yield results as they are ready, in input order or (``ordered=False``) as they finish.

    Items are pulled lazily through a bounded window (about 2 × workers × batch), so an
    endless generator runs in constant memory, consumed only as fast as results are taken.
    Stopping the iteration early (``break``) cancels what is left.

    Args:
        fn: the task.
        items: any iterable, pulled lazily.
        ordered: keep input order (results behind a slow task wait, within the window).
        errors: ``"raise"``, or ``"collect"`` to yield an :class:`Outcome` per item.
        options: an :class:`Options` to start from.
        **kwargs: as for :func:`map`.
    """
    opts = _resolve(fn, Options.build(options, errors=errors, **kwargs))
    check_arguments(fn, items)
    if opts.mode == "auto":
        return values_of(run_auto(fn, items, opts, ordered=ordered))
    return values_of(_start(fn, items, opts, ordered=ordered).chunks(items))


# -- amap / aimap ---------------------------------------------------------------------


async def amap(
    fn: Callable[[T], Awaitable[R]] | Callable[[T], R],
    items: Iterable[T] | AsyncIterable[T],
    /,
    *,
    limit: int | None = None,
    errors: ErrorPolicy = "raise",
    options: Options | None = None,
    **kwargs: Unpack[RunOptions],
) -> list[Any]:
    """Await ``fn`` on every item, at most ``limit`` at once; return results in input order.

    Coroutine functions run as tasks on the running loop; plain functions run on threads
    (``limit`` of them) so they never block the loop. ``items`` may be an async iterable.
    Other modes (``mode="processes"``) work too, without blocking the loop.

    Args:
        fn: the task, ``async`` or plain.
        items: an iterable or an async iterable, pulled lazily.
        limit: most tasks at once (the same as ``workers``). By default coroutines start
            512 at once and the run adapts the limit (higher while throughput rises, lower
            when latency shows them queueing or failures rise); plain functions run on
            threads.
        errors: ``"raise"``, or ``"collect"`` for an :class:`Outcome` per item.
        options: an :class:`Options` to start from.
        **kwargs: as for :func:`map`.
    """
    opts = _async_options(fn, items, limit, errors, options, kwargs)
    try:
        return await _amap_collect(fn, items, opts)
    except RuntimeError as exc:
        stop = task_stop(exc)
        if stop is None:
            raise
        raise iteration_error(stop, "a coroutine") from stop


async def _amap_collect(
    fn: Callable[..., Any], items: Iterable[Any] | AsyncIterable[Any], opts: Options
) -> list[Any]:
    results: list[Any] = []
    async for chunk in _arun(fn, items, opts, ordered=False, keep_all=True):
        place(results, chunk)
    return results


def aimap(
    fn: Callable[[T], Awaitable[R]] | Callable[[T], R],
    items: Iterable[T] | AsyncIterable[T],
    /,
    *,
    limit: int | None = None,
    ordered: bool = True,
    errors: ErrorPolicy = "raise",
    options: Options | None = None,
    **kwargs: Unpack[RunOptions],
) -> AsyncIterator[Any]:
    """The streaming form of :func:`amap`: ``async for result in escala.aimap(...)``.

    Breaking out of the loop and closing the iterator (``await it.aclose()``, or leaving an
    ``async with contextlib.aclosing(...)`` block) cancels what is left.
    """
    opts = _async_options(fn, items, limit, errors, options, kwargs)

    async def results() -> AsyncIterator[Any]:
        try:
            async for _, values in _arun(fn, items, opts, ordered=ordered):
                for value in values:
                    yield value
        except RuntimeError as exc:
            stop = task_stop(exc)
            if stop is None:
                raise
            raise iteration_error(stop) from stop

    return results()


def _async_options(
    fn: object,
    items: object,
    limit: int | None,
    errors: ErrorPolicy,
    options: Options | None,
    kwargs: RunOptions,
) -> Options:
    """Validate the arguments of ``amap``/``aimap``; ``limit`` is another name for workers."""
    given: dict[str, Any] = dict(kwargs)
    if limit is not None:
        if given.get("workers") not in (None, limit):
            raise TypeError("give limit or workers, not both: they are the same setting")
        given["workers"] = limit
    opts = Options.build(options, errors=errors, **given)
    check_arguments(fn, items, allow_async_items=True)
    if opts.mode == "auto":
        # Measuring would run tasks on this thread, the event loop's: amap's own default
        # (coroutines on the loop, plain functions on threads) is the right choice here.
        if opts.address is not None:
            raise ValueError(
                "mode='auto' in amap and aimap does not measure the tasks (that would run "
                "them on the event loop's thread), so it cannot weigh the cluster at "
                f"{opts.address!r}: choose mode='dask' or mode='ray' to run there, or leave "
                "address out"
            )
        opts = replace(opts, mode=None)
    return opts


async def _arun(
    fn: Callable[..., Any],
    items: Iterable[Any] | AsyncIterable[Any],
    opts: Options,
    *,
    ordered: bool,
    keep_all: bool = False,
) -> AsyncIterator[Chunk]:
    plan = plan_for(fn, opts)
    extra: dict[str, Any] = {}
    if plan.runs_on == "async":
        extra["loop"] = asyncio.get_running_loop()
    run = _start(fn, items, opts, ordered=ordered, keep_all=keep_all, plan=plan, **extra)
    async for chunk in run.achunks(items):
        yield chunk


def _start(
    fn: Callable[..., Any],
    items: object,
    opts: Options,
    *,
    ordered: bool,
    keep_all: bool = False,
    plan: Plan | None = None,
    **extra: Any,
) -> Run:
    """``start_run``, with the adaptive limit when escala chooses how many coroutines
    await at once (the default mode, no ``workers``/``limit`` given)."""
    plan = plan or plan_for(fn, opts)
    limit = None
    chosen = plan.runs_on == "async" and opts.mode is None  # auto, for a coroutine function
    if chosen and opts.workers is None:
        limit = for_coroutines(total_of(items))
        plan = replace(plan, workers=limit.high)
    run = start_run(
        fn, items, opts, ordered=ordered, keep_all=keep_all, plan=plan, limit=limit, **extra
    )
    if chosen:
        advice = decide_for_coroutine(opts.workers, total_of(items))
        run.on_end = _recorder(advice, limit)
    return run


def _recorder(advice: Advice, limit: ConcurrencyLimit | None) -> Callable[[Run, float], None]:
    """What a coroutine run that auto chose gives :func:`escala.advisor.recording`: the
    advice, and as its one leg how many tasks overlapped and where the limit ended."""

    def record(run: Run, seconds: float) -> None:
        sched = run.scheduler
        # the tasks' own time, summed, over the run's: the speed-up over awaiting them
        # one after another
        overlap = sched.busy / seconds if sched.ran and seconds > 0 else None
        at_once = advice.workers if limit is None else limit.value
        leg = Leg("async", at_once, advice.speedup, overlap, sched.ran, seconds)
        recorded(replace(advice, legs=(leg,)))

    return record
