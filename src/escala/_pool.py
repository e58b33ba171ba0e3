"""``escala.Pool``: workers kept alive across calls, futures from ``submit``."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar, Unpack

from ._core.drive import Chunk
from ._core.plan import Plan, check_arguments, collect, is_async, make_backend, plan_for, values_of
from ._core.run import Run, start_run
from ._errors import PoolClosed
from ._options import CallOptions, ErrorPolicy, Mode, Options, WorkerOptions
from ._worker.messages import Apply, Batch, Call, Done
from .backends.base import Backend

__all__ = ["Pool"]

T = TypeVar("T")
R = TypeVar("R")


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
        mode: Mode | None = None,
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
        plan = plan_for(None, self._options)
        self._plan = plan
        self._backend = make_backend(plan, self._options)
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

    def _backend_for(self, fn: Callable[..., Any]) -> Backend:
        if self._plan.runs_on != "async" or is_async(fn):
            return self._backend
        with self._lock:
            if self._threads is None:
                self._threads = make_backend(
                    Plan("threads", "threads", self._plan.workers), self._options
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
            raise PoolClosed()
        backend = self._backend_for(fn)
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        index = next(self._submitted)
        batch = Batch(Call(fn, Apply.CALL, self._options.timeout), [index], [(args, kwargs)])

        def sink(done: Done) -> None:
            if done.lost:  # never started (its worker died first): send it again
                try:
                    backend.submit(batch, sink)
                except PoolClosed as exc:
                    future.set_exception(exc)
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
        return collect(self._run(fn, items, errors, kwargs, ordered=False, keep_all=True))

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
        return values_of(self._run(fn, items, errors, kwargs, ordered=ordered))

    def _run(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        errors: ErrorPolicy,
        kwargs: CallOptions,
        *,
        ordered: bool,
        keep_all: bool = False,
    ) -> Iterator[Chunk]:
        fixed = {"mode", "workers", "initializer", "initargs", "start_method"} & set(kwargs)
        if fixed:
            raise TypeError(
                f"{sorted(fixed)[0]!r} is fixed when the pool is created; pass it to Pool(...)"
            )
        if self._closed:
            raise PoolClosed()
        opts = Options.build(self._options, errors=errors, **kwargs)
        check_arguments(fn, items)
        backend = self._backend_for(fn)
        known = self._sizes.get(id(fn))
        run = start_run(
            fn,
            items,
            opts,
            ordered=ordered,
            keep_all=keep_all,
            plan=self._plan,
            backend=backend,
            shared=True,
            start=known[1] if known is not None and known[0] is fn else 1,
        )
        return self._remember(fn, run, run.chunks(items))

    def _remember(
        self, fn: Callable[..., Any], run: Run, chunks: Iterator[Chunk]
    ) -> Iterator[Chunk]:
        try:
            yield from chunks
        finally:
            sizer = run.scheduler.sizer
            if sizer.adaptive:
                with self._lock:
                    if len(self._sizes) >= 64 and id(fn) not in self._sizes:
                        self._sizes.clear()
                    self._sizes[id(fn)] = (fn, sizer.size)

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
