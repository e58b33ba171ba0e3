"""The public entry points: options in, one backend chosen, results out.

``map``, ``imap``, ``amap``, ``aimap`` and ``Pool`` only validate, pick a backend and a
scheduler, and hand both to a driver. They hold no execution logic of their own.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import itertools
import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sized,
)
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Unpack, overload

from ._cpu import usable_cpus
from ._drive import Chunk, adrive, drive
from ._engine import BatchSizer, Outcome, Scheduler
from ._errors import PoolClosed
from ._options import CallOptions, ErrorPolicy, Options, RunOptions, WorkerOptions
from ._progress import progress_for
from .backends import create
from .backends.base import Apply, Backend, Batch, Call, Done

__all__ = ["Pool", "aimap", "amap", "imap", "map"]

T = TypeVar("T")
R = TypeVar("R")

#: Default concurrency of async mode when neither ``workers`` nor ``limit`` is given.
ASYNC_LIMIT = 100


def _is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


@dataclass(frozen=True, slots=True)
class _Plan:
    mode: str  # what the caller asked for (or the default)
    engine: str  # the backend that runs it: async mode sends plain functions to threads
    workers: int


def _plan(fn: Callable[..., Any] | None, options: Options) -> _Plan:
    is_async = fn is not None and _is_async(fn)
    mode = options.mode or ("async" if is_async else "threads")
    engine = "threads" if mode == "async" and fn is not None and not is_async else mode
    if options.workers is not None:
        workers = options.workers
    elif mode == "processes":
        workers = usable_cpus()
    elif mode == "threads":
        workers = min(32, usable_cpus() + 4)
    elif mode == "async":
        workers = ASYNC_LIMIT
    else:
        workers = 1
    return _Plan(mode, engine, workers)


def _backend(plan: _Plan, options: Options, **extra: Any) -> Backend:
    return create(
        plan.engine,
        plan.workers,
        initializer=options.initializer,
        initargs=options.initargs,
        start_method=options.start_method,
        **extra,
    )


def _scheduler(
    call: Call,
    backend: Backend,
    options: Options,
    items: object,
    *,
    ordered: bool,
    plan: _Plan,
    start: int = 1,
) -> Scheduler:
    sizer = BatchSizer(
        None if options.batch == "auto" else options.batch,
        adaptive=backend.batches_pay,
        workers=backend.workers,
        total=_total(items),
        start=start,
    )
    return Scheduler(
        call,
        workers=backend.workers,
        sizer=sizer,
        ordered=ordered,
        collect=options.errors == "collect",
        retry=options.retries,
        timeout=options.timeout,
        window=options.window,
        lookahead=1 if plan.engine == "sequential" else (2 if ordered else 4),
    )


def _check(fn: object, items: object, *, allow_async_items: bool = False) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if isinstance(items, Iterable) or (allow_async_items and isinstance(items, AsyncIterable)):
        return
    kind = "an iterable or an async iterable" if allow_async_items else "an iterable"
    raise TypeError(f"items must be {kind} (a list, a generator...), got {type(items).__name__}")


def _total(items: object) -> int | None:
    return len(items) if isinstance(items, Sized) else None


def _place(results: list[Any], chunk: Chunk) -> None:
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


def _collect(chunks: Iterator[Chunk]) -> list[Any]:
    results: list[Any] = []
    for chunk in chunks:
        _place(results, chunk)
    return results


def _values(chunks: Iterator[Chunk]) -> Iterator[Any]:
    for _, values in chunks:
        yield from values


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
            ``initializer``, ``initargs``, ``start_method``, ``window`` (see :class:`Options`).

    Raises:
        TaskTimeout: a task ran past ``timeout``.
        WorkerDied: the worker process running a task died.
        SendError: an item, result or exception could not cross to or from a worker.
    """
    opts = Options.build(options, errors=errors, **kwargs)
    _check(fn, items)
    return _collect(_run(fn, items, opts, ordered=False))


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
    opts = Options.build(options, errors=errors, **kwargs)
    _check(fn, items)
    return _values(_run(fn, items, opts, ordered=ordered))


def _run(
    fn: Callable[..., Any], items: Iterable[Any], opts: Options, *, ordered: bool
) -> Iterator[Chunk]:
    plan = _plan(fn, opts)
    backend = _backend(plan, opts)
    sched = _scheduler(Call(fn), backend, opts, items, ordered=ordered, plan=plan)
    return _owned(backend, sched, items, opts, plan)


def _owned(
    backend: Backend, sched: Scheduler, items: Iterable[Any], opts: Options, plan: _Plan
) -> Iterator[Chunk]:
    started = False
    try:
        backend.start()
        started = True
        progress = progress_for(opts.progress, plan.mode, _total(items))
        yield from drive(backend, sched, items, owned=True, progress=progress)
    finally:
        if not started:
            backend.shutdown(cancel=True)


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
        limit: most tasks at once (the same as ``workers``); 100 by default for async.
        errors: ``"raise"``, or ``"collect"`` for an :class:`Outcome` per item.
        options: an :class:`Options` to start from.
        **kwargs: as for :func:`map`.
    """
    opts = _async_options(fn, items, limit, errors, options, kwargs)
    results: list[Any] = []
    async for chunk in _arun(fn, items, opts, ordered=False):
        _place(results, chunk)
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
        async for _, values in _arun(fn, items, opts, ordered=ordered):
            for value in values:
                yield value

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
    _check(fn, items, allow_async_items=True)
    return opts


async def _arun(
    fn: Callable[..., Any],
    items: Iterable[Any] | AsyncIterable[Any],
    opts: Options,
    *,
    ordered: bool,
) -> AsyncIterator[Chunk]:
    plan = _plan(fn, opts)
    extra: dict[str, Any] = {}
    if plan.engine == "async":
        import asyncio

        extra["loop"] = asyncio.get_running_loop()
    backend = _backend(plan, opts, **extra)
    sched = _scheduler(Call(fn), backend, opts, items, ordered=ordered, plan=plan)
    backend.start()
    try:
        progress = progress_for(opts.progress, plan.mode, _total(items))
    except BaseException:
        backend.shutdown(cancel=True)
        raise
    async for chunk in adrive(backend, sched, items, owned=True, progress=progress):
        yield chunk


# -- Pool -----------------------------------------------------------------------------


class Pool:
    """Workers kept alive across many calls: ``submit`` single calls, ``map`` whole inputs.

    Use it as a context manager: leaving the block waits for submitted work and stops the
    workers; leaving it with an exception (Ctrl-C included) cancels what is left.

    Args:
        mode: ``"processes"``, ``"threads"``, ``"async"`` or ``"sequential"``; default
            threads.
        workers: how many workers (as for :func:`map`).
        options: an :class:`Options` to start from.
        **kwargs: defaults for every call: ``timeout``, ``retries``, ``batch``,
            ``progress``, and the worker settings ``initializer``, ``initargs``,
            ``start_method``.
    """

    def __init__(
        self,
        mode: str | None = None,
        workers: int | None = None,
        *,
        options: Options | None = None,
        **kwargs: Unpack[WorkerOptions],
    ) -> None:
        given: dict[str, Any] = dict(kwargs)
        if mode is not None:
            given["mode"] = mode
        if workers is not None:
            given["workers"] = workers
        self._options = Options.build(options, **given)
        plan = _plan(None, self._options)
        self._plan = plan
        self._backend = _backend(plan, self._options)
        self._threads: Backend | None = None  # plain functions given to an async pool
        self._lock = threading.Lock()
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._submitted = itertools.count()
        # Batch size each function ended its last run with: the next run starts there
        # instead of ramping up from one task again. Bounded; the functions are kept
        # alive so that their ids stay theirs.
        self._sizes: dict[int, tuple[Callable[..., Any], int]] = {}
        self._closed = False
        self._backend.start()

    @property
    def mode(self) -> str:
        """The execution model of this pool."""
        return self._plan.mode

    @property
    def workers(self) -> int:
        """How many tasks run at once."""
        return self._backend.workers

    def _engine_for(self, fn: Callable[..., Any]) -> Backend:
        if self._plan.engine != "async" or _is_async(fn):
            return self._backend
        with self._lock:
            if self._threads is None:
                self._threads = _backend(
                    _Plan("threads", "threads", self._plan.workers), self._options
                )
                self._threads.start()
            return self._threads

    def submit(
        self, fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[R]:
        """Run ``fn(*args, **kwargs)`` on a worker; return a future for its result.

        The pool's ``timeout`` applies; ``retries`` apply to ``map`` and ``imap`` only.
        Cancelling the future before a worker takes it removes it from the queue.

        Raises:
            PoolClosed: the pool is shut down.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if self._closed:
            raise PoolClosed("this pool is shut down; create a new one")
        backend = self._engine_for(fn)
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        index = next(self._submitted)
        batch = Batch(Call(fn, Apply.CALL), [index], [(args, kwargs)], self._options.timeout)

        def sink(done: Done) -> None:
            if done.lost:
                backend.submit(batch, sink)
                return
            with self._lock:
                self._futures.discard(future)
            if future.cancelled():
                return
            try:
                if done.failures:
                    future.set_exception(done.failures[0].exception(index))
                else:
                    future.set_result(done.values[0])
            except concurrent.futures.InvalidStateError:
                pass  # cancelled meanwhile

        def cancelled(fut: concurrent.futures.Future[R]) -> None:
            if fut.cancelled():
                backend.cancel(sink)

        with self._lock:
            self._futures.add(future)
        future.add_done_callback(cancelled)
        backend.submit(batch, sink)
        return future

    def map(
        self,
        fn: Callable[[T], R] | Callable[[T], Awaitable[R]],
        items: Iterable[T],
        /,
        *,
        errors: ErrorPolicy = "raise",
        **kwargs: Unpack[CallOptions],
    ) -> list[Any]:
        """Like :func:`escala.map`, on this pool's workers."""
        return _collect(self._run(fn, items, errors, kwargs, ordered=False))

    def imap(
        self,
        fn: Callable[[T], R] | Callable[[T], Awaitable[R]],
        items: Iterable[T],
        /,
        *,
        ordered: bool = True,
        errors: ErrorPolicy = "raise",
        **kwargs: Unpack[CallOptions],
    ) -> Iterator[Any]:
        """Like :func:`escala.imap`, on this pool's workers."""
        return _values(self._run(fn, items, errors, kwargs, ordered=ordered))

    def _run(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        errors: ErrorPolicy,
        kwargs: CallOptions,
        *,
        ordered: bool,
    ) -> Iterator[Chunk]:
        fixed = {"mode", "workers", "initializer", "initargs", "start_method"} & set(kwargs)
        if fixed:
            raise TypeError(
                f"{sorted(fixed)[0]!r} is fixed when the pool is created; pass it to Pool(...)"
            )
        if self._closed:
            raise PoolClosed("this pool is shut down; create a new one")
        opts = Options.build(self._options, errors=errors, **kwargs)
        _check(fn, items)
        backend = self._engine_for(fn)
        known = self._sizes.get(id(fn))
        start = known[1] if known is not None and known[0] is fn else 1
        sched = _scheduler(
            Call(fn), backend, opts, items, ordered=ordered, plan=self._plan, start=start
        )
        progress = progress_for(opts.progress, self._plan.mode, _total(items))
        return self._remember(
            fn, sched, drive(backend, sched, items, owned=False, progress=progress)
        )

    def _remember(
        self, fn: Callable[..., Any], sched: Scheduler, chunks: Iterator[Chunk]
    ) -> Iterator[Chunk]:
        try:
            yield from chunks
        finally:
            if sched.sizer.adaptive:
                with self._lock:
                    if len(self._sizes) >= 64 and id(fn) not in self._sizes:
                        self._sizes.clear()
                    self._sizes[id(fn)] = (fn, sched.sizer.size)

    def close(self) -> None:
        """Finish the submitted work, then stop the workers."""
        self._shutdown(cancel=False)

    def terminate(self) -> None:
        """Stop the workers now; unfinished futures are cancelled."""
        self._shutdown(cancel=True)

    def _shutdown(self, *, cancel: bool) -> None:
        self._closed = True
        for backend in (self._backend, self._threads):
            if backend is not None:
                backend.shutdown(cancel=cancel)
        with self._lock:
            left, self._futures = self._futures, set()
        for future in left:
            future.cancel()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._shutdown(cancel=exc_type is not None)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<escala.Pool mode={self.mode!r} workers={self.workers} {state}>"
