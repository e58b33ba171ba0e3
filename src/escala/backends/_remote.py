"""What every cluster engine backend shares (Dask mode, Ray mode).

A cluster backend runs each escala batch (or, with a timeout, each task of it) as one task
of the engine, which runs escala's own batch runner in a remote worker. What is the same
whatever the engine lives here: the bookkeeping of a batch's pieces (:class:`RemoteBatch`,
:class:`Piece`), the reading of what a remote batch answers (the replies of
:mod:`escala._worker.wire`), the search for a culprit by running a batch again one task at
a time, and the worker-side runner (:class:`WorkerState`). Connecting, submitting,
cancelling and reading the engine's own errors stay in each engine's module.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._errors import BrokenWorker, EscalaError, PoolClosed, RemoteTraceback, SendError
from .._worker.context import WorkerContext
from .._worker.messages import Apply, Batch, Call, Done, Failure, Sink
from .._worker.pickling import dump_exception, dump_function, dump_values, loads
from .._worker.wire import InitFailed, Ran, Reply, Unloadable

#: Distinct functions kept in the cluster (and decoded in each worker) before the oldest
#: are released.
FUNCTION_CACHE = 256


@dataclass(eq=False)
class RemoteBatch:
    """One escala batch handed to a cluster, and what its pieces have reported so far.

    Attributes:
        left: pieces not yet reported; the batch is reported to its sink at zero.
    """

    batch: Batch
    sink: Sink
    values: list[Any]
    failures: dict[int, Failure] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)
    busy: float = 0.0
    split: bool = False
    left: int = 0


@dataclass(eq=False)
class Piece:
    """One engine task: a whole batch, or (with a timeout) one task of it."""

    whole: RemoteBatch  # the batch this is a piece of
    start: int  # first position in the batch
    count: int


class RemoteBackend:
    """The engine-independent half of a cluster backend.

    A subclass sets up its state with :meth:`_setup`, stores functions in its cluster
    (:meth:`_store`) and hands each result of the worker-side runner to :meth:`_decode`.
    """

    #: The engine's name, as messages give it ("Dask", "Ray").
    engine: ClassVar[str]

    workers: int

    def _setup(self, workers: int) -> None:
        """Set up the state every cluster backend keeps, for ``workers`` tasks at once."""
        self.workers = workers
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pieces: dict[Any, Any] = {}  # pieces handed to the engine, by _key
        self._queue: deque[Any] = deque()  # pieces waiting for a free worker
        self._reporting = 0  # pieces done whose sink has not yet been called
        self._slots = workers
        self._shipped: dict[int, tuple[Callable[..., Any], Any]] = {}
        self._cancelled: dict[int, Sink] = {}
        self._closed = False
        self._broken: BaseException | None = None

    def capacity(self) -> int:
        """Return how many tasks the cluster runs at once (its worker threads, or CPUs),
        whatever this backend's ``workers``; once started."""
        raise NotImplementedError

    def _room(self, piece: Any) -> int:
        """Return how many pieces may be in the engine's hands when ``piece`` is next:
        one per slot, so that each starts as soon as it is handed over (an engine may
        override this when its scheduler gives a waiting task to whichever slot frees)."""
        return self._slots

    # -- caller side ----------------------------------------------------------------

    def _store(self, data: bytes) -> Any:
        """Put a cloudpickled function in the cluster; return what tasks refer to it by."""
        raise NotImplementedError

    def _accept(self, batch: Batch, sink: Sink) -> tuple[RemoteBatch, Any, bytes] | None:
        """Check and encode a batch: its bookkeeping, its function's reference, its items.

        Returns ``None`` where the batch was already reported (the pool broke, or an
        argument could not be pickled).
        """
        if self._closed:
            raise PoolClosed()
        size = len(batch.items)
        if self._broken is not None:
            fail_all(batch, sink, self._broken)
            return None
        fn_ref = self._ship(batch.call.fn)
        items, bad = dump_values(batch.items, "argument", lambda pos: f"task #{batch.indices[pos]}")
        if bad:
            lost = [pos for pos in range(size) if pos not in bad]
            sink(Done(batch, [None] * size, bad, lost))
            return None
        return RemoteBatch(batch, sink, [None] * size), fn_ref, items

    def _ship(self, fn: Callable[..., Any]) -> Any:
        """Return the function's reference in the cluster: cloudpickled and stored once,
        whatever it carries."""
        with self._lock:
            known = self._shipped.get(id(fn))
            if known is not None and known[0] is fn:
                return known[1]
        ref = self._store(dump_function(fn))
        with self._lock:
            if len(self._shipped) >= FUNCTION_CACHE:
                self._shipped.clear()  # released once no task refers to them
            self._shipped[id(fn)] = (fn, ref)
        return ref

    def _drop_queued(self, sink: Sink) -> None:
        """Mark a sink's batches unwanted and drop its queued pieces (lock held)."""
        self._cancelled[id(sink)] = sink
        kept = [p for p in self._queue if p.whole.sink is not sink]
        self._queue.clear()
        self._queue.extend(kept)

    # -- completions ------------------------------------------------------------------

    def _key(self, piece: Any) -> Hashable:
        """Where a piece handed to the engine is kept in ``_pieces``."""
        raise NotImplementedError

    def _pump(self) -> None:
        """Hand queued pieces to the engine while a worker is free."""
        raise NotImplementedError

    def _report(self, piece: Any, future: Any, unwanted: bool) -> None:
        """Report a piece the engine is done with (``unwanted``: its sink was cancelled)."""
        raise NotImplementedError

    def _piece_done(self, piece: Any, future: Any) -> None:
        with self._lock:
            if self._pieces.pop(self._key(piece), None) is None:
                return  # timed out, or cancelled by shutdown: reported or unwanted
            self._reporting += 1
            unwanted = id(piece.whole.sink) in self._cancelled
        try:
            self._pump()
            self._report(piece, future, unwanted)
        finally:
            with self._lock:
                self._reporting -= 1
                self._changed.notify_all()

    def _failed(self, piece: Piece, exc: Exception) -> None:
        """The cluster could not run a piece, for a reason of its own."""
        error = EscalaError(
            f"the {self.engine} cluster could not run {names(piece)}: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        self._fill(piece, error)

    def _decode(self, piece: Piece, reply: Reply) -> None:
        """Report what :meth:`WorkerState.run` answered for a piece."""
        match reply:
            case InitFailed(failure):
                broken = BrokenWorker.initializer(
                    f"{failure.type_name}: {failure.message}", where=f"a {self.engine} worker"
                )
                broken.__cause__ = RemoteTraceback(failure.traceback)
                self._broken = broken
                self._fill(piece, broken)
            case Unloadable(failure):
                why = f"could not be loaded in the {self.engine} worker"
                self._unloadable(piece, failure, why)
            case Ran(values_bytes, failures, busy):
                try:
                    values = loads(values_bytes)
                except Exception as exc:
                    text = f"{type(exc).__name__}: {exc}"
                    failure = Failure(
                        type_name=type(exc).__name__, message=str(exc), traceback=text
                    )
                    self._unloadable(piece, failure, "could not be rebuilt in the caller", True)
                    return
                whole = piece.whole
                whole.values[piece.start : piece.start + piece.count] = values
                for pos, fail in (failures or {}).items():
                    whole.failures[piece.start + pos] = fail
                whole.busy += busy
                self._finish(piece)

    def _finish(self, piece: Piece) -> None:
        whole = piece.whole
        with self._lock:
            whole.left -= 1
            if whole.left:
                return
        batch = whole.batch
        if whole.split:
            # the culprit is looked for alone: report none of the batch as done
            size = len(batch.items)
            whole.sink(Done(batch, [None] * size, lost=list(range(size)), split=True))
            return
        busy = 0.0 if whole.lost or batch.call.timeout is not None else whole.busy
        whole.sink(Done(batch, whole.values, whole.failures or None, sorted(whole.lost), busy))

    def _fill(self, piece: Piece, error: BaseException) -> None:
        for pos in range(piece.start, piece.start + piece.count):
            piece.whole.failures[pos] = Failure(error=error)
        self._finish(piece)

    def _lose(self, piece: Piece) -> None:
        piece.whole.lost.extend(range(piece.start, piece.start + piece.count))
        with self._lock:  # the function's stored copy may be what was lost
            self._shipped.pop(id(piece.whole.batch.call.fn), None)
        self._finish(piece)

    def _split(self, piece: Piece) -> bool:
        """Have a batch of several tasks run again one by one, to find which one is at
        fault; return False for a single task, which is blamed itself."""
        if piece.count > 1:
            piece.whole.split = True
            self._finish(piece)
            return True
        return False

    def _unloadable(self, piece: Piece, failure: Failure, why: str, result: bool = False) -> None:
        if self._split(piece):
            return
        error = SendError.unloadable(
            piece.whole.batch.indices[piece.start],
            what="result" if result else "argument (or function)",
            why=why,
            error=f"{failure.type_name}: {failure.message}",
            workers=f"the {self.engine} workers",
        )
        error.__cause__ = RemoteTraceback(failure.traceback)
        self._fill(piece, error)


def names(piece: Piece) -> str:
    """Name a piece's tasks for a message: ``task #3, #4 and 6 more``."""
    indices = piece.whole.batch.indices[piece.start : piece.start + piece.count]
    shown = [f"#{i}" for i in indices[:2]]
    more = len(indices) - len(shown)
    return "task " + ", ".join(shown) + (f" and {more} more" if more else "")


def fail_all(batch: Batch, sink: Sink, error: BaseException) -> None:
    """Report every task of a batch failed with ``error``."""
    failure = Failure(error=error)
    sink(Done(batch, [None] * len(batch.items), dict.fromkeys(range(len(batch.items)), failure)))


# -- inside a remote worker -----------------------------------------------------------


class WorkerState:
    """What a remote worker process keeps between tasks: decoded functions, and a worker
    context (initializer state, event loop) per run and thread.

    Args:
        context_cache: contexts kept before the oldest is closed; ``None`` keeps them
            until :meth:`forget` closes a run's.
    """

    def __init__(self, context_cache: int | None = None) -> None:
        self.functions: dict[bytes, Callable[..., Any]] = {}
        self.contexts: dict[tuple[str, int], WorkerContext] = {}
        self.lock = threading.Lock()
        self.context_cache = context_cache

    def run(
        self,
        fn_bytes: bytes,
        init: bytes | None,
        token: str,
        apply: int,
        indices: list[int],
        items_bytes: bytes,
        where: str,
        dump_failure: Callable[[BaseException, str], Failure] = dump_exception,
    ) -> Reply:
        """Run one batch with escala's batch runner; answer what
        :meth:`RemoteBackend._decode` reads. Nothing the task raises escapes.

        Args:
            where: the worker, as failures name it.
            dump_failure: how an exception the function raised is encoded.
        """
        ctx_key = (token, threading.get_ident())
        ctx = self.contexts.get(ctx_key)
        if ctx is None:
            try:
                if init is not None:
                    initializer, initargs = loads(init)
                    ctx = WorkerContext(initializer, initargs)
                else:
                    ctx = WorkerContext()
                ctx.enter()
                ctx.initialize()
            except BaseException as exc:  # nothing the initializer raises escapes either
                return InitFailed(dump_exception(exc, where))
            with self.lock:
                if self.context_cache is not None:
                    # runs long finished, on a shared cluster
                    while len(self.contexts) >= self.context_cache:
                        old = self.contexts.pop(next(iter(self.contexts)))
                        try:
                            old.close()
                        except Exception:
                            pass
                self.contexts[ctx_key] = ctx
        ctx.enter()
        try:
            fn = self.functions.get(fn_bytes)
            if fn is None:
                fn = loads(fn_bytes)
                with self.lock:
                    if len(self.functions) >= FUNCTION_CACHE:
                        self.functions.clear()
                    self.functions[fn_bytes] = fn
            items = loads(items_bytes)
        except BaseException as exc:
            return Unloadable(dump_exception(exc, where))
        batch = Batch(Call(fn, Apply(apply)), indices, items)
        values, errors, busy = ctx.run_batch(batch)
        failures = (
            {pos: dump_failure(exc, where) for pos, exc in errors.items()} if errors else None
        )
        values_bytes, bad = dump_values(values, "result", lambda pos: f"task #{indices[pos]}")
        if bad:
            failures = {**(failures or {}), **bad}
        return Ran(values_bytes, failures, busy)

    def forget(self, token: str) -> None:
        """Close the worker contexts of a finished run."""
        with self.lock:
            for key in [k for k in self.contexts if k[0] == token]:
                ctx = self.contexts.pop(key)
                try:
                    ctx.close()
                except Exception:
                    pass
