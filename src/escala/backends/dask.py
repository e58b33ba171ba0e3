"""Dask mode: batches run as tasks on a Dask distributed cluster.

One escala batch is one Dask task, which runs escala's own batch runner on a Dask worker
thread, so batching and per-task error capture are those of processes mode. The function
(with whatever it carries: a ``functools.partial``'s large argument, a closure's data) is
cloudpickled once per run and scattered to the workers, and every task refers to it by key::

    caller threads                  Dask client (its loop thread)              Dask workers
    ──────────────                  ─────────────────────────────              ────────────
    submit(batch):
      function: cloudpickle, scatter once ────────────────────────────────▶ kept by key
      items: pickle (errors name the item)
      client.submit(_run_batch, key, items) ──────────────────────────────▶ run_batch
    sink(Done) ◀── done callback ("Dask-Callback-Thread"): gather ◀──────── result bytes

    with a timeout, each task is a Dask task of its own that logs a start event
    ──▶ watchdog thread ("escala-dask-watchdog"): past the deadline, cancel the task and
        kill its worker process (its nanny starts another)

The engine above bounds what is in flight (the window), and ``submit`` hands each batch to
Dask at once: nothing is buffered here, so Dask never holds more than the window.

A Python task cannot be interrupted inside its worker thread. A task past its timeout is
stopped by killing the Dask worker process that runs it (``stopped=True``), which costs that
worker's other running tasks (Dask runs them again elsewhere) and its data, and a worker
restart (about a second). A worker without a nanny cannot be restarted: then the task is
abandoned (``stopped=False``) and its worker thread stays busy until the function returns.

A task that kills its worker (``os._exit``, a segfault, the OOM killer) is run again by
Dask on another worker, up to the scheduler's ``allowed-failures`` (3 by default; 1 on the
local clusters escala starts); then Dask gives up with ``KilledWorker``, which becomes
:class:`~escala.WorkerDied` for a single task, or runs a batch's tasks one by one to find
the culprit.
"""

from __future__ import annotations

import asyncio
import copyreg
import io
import itertools
import logging
import os
import pickle
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import dask
import distributed

from .._errors import EscalaError, TaskTimeout, WorkerDied
from .._worker.cpu import usable_cpus
from .._worker.messages import Batch, Failure, Sink
from .._worker.pickling import dump_exception, dump_function, dumps, loads
from .._worker.wire import Reply
from ._remote import Piece, RemoteBackend, WorkerState

__all__ = ["DaskBackend"]

#: Times Dask may run a task again after its worker died, on the clusters escala starts.
ALLOWED_FAILURES = 1
#: Seconds to wait for the scheduler when connecting to an address.
CONNECT_TIMEOUT = 30
#: Seconds a run's function may take to reach every worker before it goes to one only...
BROADCAST_TIMEOUT = 10
#: ...and to reach that one, before the run fails.
SCATTER_TIMEOUT = 30

_keys = itertools.count(1)


@dataclass(eq=False)
class _Piece(Piece):
    """One Dask task: a whole batch, or (with a timeout) one task of it."""

    key: str
    args: tuple[Any, ...] = ()
    future: Any = None
    started: float | None = None  # when its start event came (timed pieces)
    worker: str | None = None


class _Answer(NamedTuple):
    """What a Dask task of escala's returns: the runner's reply, and who ran it."""

    reply: Reply
    address: str  # the Dask worker's address
    pid: int  # its process id, which messages give


class DaskBackend(RemoteBackend):
    """Run batches as tasks on a Dask distributed cluster.

    Args:
        workers: tasks to keep running at once; ``0`` means the cluster's worker threads.
        address: the scheduler's address (``"tcp://host:8786"``). ``None`` uses the current
            Dask client if there is one, else starts a local cluster of one single-threaded
            worker process per usable core, closed again at shutdown.
        initializer: run once in each Dask worker thread before its first task of this run.
        initargs: its arguments.
    """

    batches_pay = True  # a Dask task costs about a millisecond: batch small tasks
    engine = "Dask"

    def __init__(
        self,
        workers: int,
        *,
        address: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        **_: Any,
    ) -> None:
        self._token = uuid.uuid4().hex
        self._topic = f"escala-start-{self._token}"
        self._init = dump_function((initializer, initargs)) if initializer else None
        self._cluster: Any = None
        self._owned = False  # this backend made the client (and maybe the cluster)
        self._client: Any = None
        if address is not None:
            try:
                _reach(address)
                self._client = distributed.Client(
                    address, timeout=CONNECT_TIMEOUT, set_as_default=False
                )
            except OSError as exc:
                raise EscalaError(
                    f"could not reach the Dask scheduler at {address!r}: {exc}. Start one "
                    "(dask scheduler), check the address, or leave address out to start a "
                    "local cluster."
                ) from exc
            self._owned = True
            # a backend dropped before start (an imap never iterated) closes its connection
            self._finalizer = weakref.finalize(self, self._client.close)
        else:
            try:
                current = distributed.Client.current(allow_global=True)
            except ValueError:
                current = None
            if current is not None and current.status == "running":
                self._client = current
        if workers:
            self._setup(workers)
        elif self._client is not None:
            self._setup(max(1, _threads(self._client)))
        else:
            self._setup(usable_cpus())
        self._pieces: dict[str, _Piece] = {}  # handed to Dask
        self._placement: list[str] | None = None  # the workers preferred, if not all
        self._init_future: Any = None
        self._pids: dict[str, int] = {}
        self._nannies: dict[str, bool] = {}
        self._watchdog: threading.Thread | None = None
        self._subscribed = False

    # -- caller side ----------------------------------------------------------------

    def start(self) -> None:
        if self._client is None:
            with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
                self._cluster = distributed.LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    # the scheduler serves /health even without a dashboard: on a free
                    # loopback port, not 8787 (another cluster may hold it)
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                    # escala reports what matters (a worker died, was stopped); Dask's own
                    # warnings about restarting it would only repeat that on stderr
                    silence_logs=logging.ERROR,
                )
            try:
                self._client = distributed.Client(self._cluster, set_as_default=False)
            except BaseException:
                self._cluster.close()
                raise
            self._owned = True
        self._learn_workers()
        # as many tasks at once as asked for (``workers``), never more than there are
        # worker threads to run them
        self._slots = max(1, min(self.workers, _threads(self._client)))
        if self._slots < _threads(self._client):
            # fewer tasks at once than the cluster has threads: prefer as few workers as
            # hold them, so that workers=1 means one worker (and one worker_state()) here too
            self._placement = []
            threads = 0
            for address, info in sorted(self._client.scheduler_info()["workers"].items()):
                if threads >= self._slots:
                    break
                self._placement.append(address)
                threads += int(info.get("nthreads", 1))
        if self._init is not None:
            self._init_future = self._client.scatter(self._init, broadcast=True, hash=False)

    def capacity(self) -> int:
        return _threads(self._client)

    def _learn_workers(self) -> None:
        for address, info in self._client.scheduler_info()["workers"].items():
            self._pids[address] = int(info.get("pid", 0))
            self._nannies[address] = bool(info.get("nanny"))

    def submit(self, batch: Batch, sink: Sink) -> None:
        accepted = self._accept(batch, sink)
        if accepted is None:
            return
        whole, fn_future, items = accepted
        size = len(batch.items)
        if batch.call.timeout is None:
            pieces = [(0, size, items)]
            topic = None
        else:
            self._watch()
            pieces = [(pos, 1, dumps([item])) for pos, item in enumerate(batch.items)]
            topic = self._topic
        whole.left = len(pieces)
        with self._lock:
            for start, count, data in pieces:
                key = f"escala-{next(_keys)}-{self._token[:8]}"
                indices = list(batch.indices[start : start + count])
                args: tuple[Any, ...] = (fn_future, self._init_future, self._token)
                args += (int(batch.call.apply), indices, data, topic, key)
                self._queue.append(_Piece(whole, start, count, key, args))
        self._pump()

    def _pump(self) -> None:
        """Hand queued pieces to Dask while a worker thread is free.

        One task per worker thread, as Dask's own queuing does for root tasks: a task sent
        to a busy worker waits there behind whatever that worker runs, however long, while
        another worker may be idle. Batching makes the round trip between two tasks small
        against the task itself, and the engine's window bounds what waits here.
        """
        while True:
            with self._lock:
                if len(self._pieces) >= self._slots or not self._queue:
                    return
                piece = self._queue.popleft()
                self._pieces[piece.key] = piece
            piece.future = self._client.submit(
                _run_batch,
                *piece.args,
                key=piece.key,
                pure=False,
                workers=self._placement,
                allow_other_workers=self._placement is not None,  # a preference, not a rule
            )
            piece.args = ()
            piece.future.add_done_callback(partial(self._piece_done, piece))

    def _store(self, data: bytes) -> Any:
        """Scatter a cloudpickled function to every worker; return its future.

        A broadcast waits for every worker, and one that a nanny has just restarted can
        keep it waiting for good (seen in CI, after a timed-out task's worker was killed):
        after ``BROADCAST_TIMEOUT`` the function goes to one worker, and the others fetch
        it from there when they need it.
        """
        try:
            return self._client.scatter(data, broadcast=True, hash=False, timeout=BROADCAST_TIMEOUT)
        except (TimeoutError, distributed.TimeoutError):
            pass
        try:
            return self._client.scatter(data, hash=False, timeout=SCATTER_TIMEOUT)
        except (TimeoutError, distributed.TimeoutError) as exc:
            raise EscalaError(
                f"the Dask cluster did not take the function within {SCATTER_TIMEOUT:g} s "
                "(are its workers alive? see its dashboard or logs)"
            ) from exc

    def cancel(self, sink: Sink) -> None:
        with self._lock:
            self._drop_queued(sink)
            futures = [p.future for p in self._pieces.values() if p.whole.sink is sink]
        if futures:
            self._client.cancel([f for f in futures if f is not None])

    def shutdown(self, *, cancel: bool) -> None:
        with self._lock:
            if self._closed and not cancel:
                return
            self._closed = True
            self._changed.notify_all()
            pieces = list(self._pieces.values())
            if cancel:
                self._pieces.clear()
                self._queue.clear()
        client = self._client
        if client is not None:
            if cancel and pieces:
                try:
                    client.cancel([p.future for p in pieces if p.future is not None])
                except Exception:  # the cluster is gone already: nothing to cancel
                    pass
            elif not cancel:
                with self._lock:
                    self._changed.wait_for(
                        lambda: not (self._pieces or self._queue or self._reporting)
                    )
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join()
            self._watchdog = None
        if client is None:
            return
        if self._subscribed:
            client.unsubscribe_topic(self._topic)
            self._subscribed = False
        self._shipped.clear()
        self._init_future = None
        if self._owned:
            client.close()
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None
        elif client.status == "running":
            try:  # close this run's event loops and state in the workers we share
                client.run(_forget, self._token, wait=False)
            except Exception:
                pass

    async def aclose(self, *, cancel: bool) -> None:
        # waiting for the cluster's tasks and closing the client block: off the loop
        await asyncio.to_thread(self.shutdown, cancel=cancel)

    # -- completions (on Dask's callback thread) ---------------------------------------

    def _key(self, piece: _Piece) -> str:
        return piece.key  # as the start events name it

    def _report(self, piece: _Piece, future: Any, unwanted: bool) -> None:
        if unwanted or future.status == "cancelled":
            if not unwanted and not self._closed:
                self._lose(piece)  # cancelled by the cluster (its data was lost): again
            return
        try:
            answer: _Answer = future.result()
        except distributed.KilledWorker as exc:
            self._killed(piece, exc)
            return
        except CancelledError:
            if not self._closed:
                self._lose(piece)
            return
        except Exception as exc:
            self._failed(piece, exc)
            return
        self._pids[answer.address] = answer.pid
        self._decode(piece, answer.reply)

    def _killed(self, piece: _Piece, exc: BaseException) -> None:
        """Dask gave up on a task whose workers kept dying: blame it, or find the culprit."""
        if self._split(piece):
            return
        last = getattr(getattr(exc, "last_worker", None), "address", None) or "?"
        tries = int(getattr(exc, "allowed_failures", 0)) + 1
        pid = self._pids.get(last, 0)
        error = WorkerDied(
            piece.whole.batch.indices[piece.start],
            worker=f"Dask worker {last} (pid {pid or 'unknown'})",
            exitcode=None,
            pid=pid,
            how=f"died, and so did every worker Dask tried it on ({tries} in all); Dask does "
            "not say how a worker ended: its nanny's log does",
        )
        error.__cause__ = exc
        self._fill(piece, error)

    # -- timeouts ---------------------------------------------------------------------

    def _watch(self) -> None:
        with self._lock:
            if self._watchdog is not None:
                return
            self._client.subscribe_topic(self._topic, self._started)
            self._subscribed = True
            self._watchdog = threading.Thread(
                target=self._enforce, name="escala-dask-watchdog", daemon=True
            )
            self._watchdog.start()

    def _started(self, event: tuple[float, Any]) -> None:
        """A timed task began on a worker (runs on the client's loop thread).

        The event is a plain ``(key, address, pid)``: Dask sends events with msgpack,
        which knows no classes of escala's.
        """
        key, address, pid = event[1]
        with self._lock:
            piece = self._pieces.get(key)
            if piece is not None:
                piece.started, piece.worker = time.monotonic(), address
                self._pids[address] = pid
                self._changed.notify_all()

    def _enforce(self) -> None:
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                wake: float | None = None
                late: list[_Piece] = []
                for piece in self._pieces.values():
                    timeout = piece.whole.batch.call.timeout
                    if piece.started is None or timeout is None:
                        continue
                    due = piece.started + timeout
                    if due <= now:
                        late.append(piece)
                    elif wake is None or due < wake:
                        wake = due
                for piece in late:
                    del self._pieces[piece.key]
                if late:
                    self._lock.release()
                    try:
                        for piece in late:
                            self._stop(piece)
                        self._pump()
                    finally:
                        self._lock.acquire()
                    continue
                self._changed.wait(None if wake is None else wake - now)

    def _stop(self, piece: _Piece) -> None:
        """Cancel an overrunning task and kill its worker process, if it can come back."""
        timeout = piece.whole.batch.call.timeout
        assert timeout is not None
        address = piece.worker or "?"
        if address not in self._nannies:
            try:
                self._learn_workers()
            except Exception:
                pass
        stoppable = self._nannies.get(address, False)
        why = "has no nanny to restart it"
        try:
            piece.future.cancel()
            if stoppable:
                self._client.run(_kill_worker, workers=[address], wait=False)
        except Exception as exc:
            stoppable = False
            why = f"could not be stopped ({type(exc).__name__}: {exc})"
        if stoppable:
            how = (
                f"its Dask worker {address} (pid {self._pids.get(address, 0)}) was killed and "
                "its nanny starts another"
            )
        else:
            how = (
                f"its Dask worker {address} {why}, so escala stopped waiting instead: the task "
                "goes on in that worker until the function returns"
            )
        index = piece.whole.batch.indices[piece.start]
        error = TaskTimeout(index, timeout, stopped=stoppable, how=how, advise=False)
        self._fill(piece, error)


def _reach(address: str) -> None:
    """Connect to a scheduler once and hang up, on an event loop of escala's own.

    A ``distributed.Client`` that cannot connect raises from its constructor and leaves
    its event loop's thread ("IO loop") running for the life of the process; an address
    that cannot be reached fails here first, and leaves nothing behind.

    Raises:
        OSError: nothing answered at ``address`` within ``CONNECT_TIMEOUT``.
    """
    from distributed.comm import connect
    from distributed.utils import LoopRunner

    async def hello() -> None:
        comm = await connect(address, timeout=CONNECT_TIMEOUT)
        await comm.close()

    runner = LoopRunner()
    runner.start()
    try:
        runner.run_sync(hello)
    finally:
        runner.stop()


def _threads(client: Any) -> int:
    return sum(int(w.get("nthreads", 1)) for w in client.scheduler_info()["workers"].values())


# -- inside a Dask worker -------------------------------------------------------------

_worker = WorkerState()  # contexts are kept until the run's _forget


def _run_batch(
    fn_bytes: bytes,
    init: bytes | None,
    token: str,
    apply: int,
    indices: list[int],
    items_bytes: bytes,
    topic: str | None,
    key: str,
) -> _Answer:
    """Run one batch in a Dask worker thread; return what :meth:`DaskBackend._report`
    reads. Nothing the task raises escapes: failures travel back in the reply."""
    worker = distributed.get_worker()
    address, pid = worker.address, os.getpid()
    where = f"Dask worker {address} (pid {pid})"
    if topic is not None:
        worker.log_event(topic, (key, address, pid))
    reply = _worker.run(fn_bytes, init, token, apply, indices, items_bytes, where, _dump_exception)
    return _Answer(reply, address, pid)


def _dump_exception(exc: BaseException, where: str) -> Failure:
    """:func:`dump_exception`, without the reducers that Dask workers install.

    Dask workers register tblib's reducers for every exception type (to ship tracebacks),
    and those lose attributes that are not in ``args``: ``SystemExit(7).code`` comes back
    ``None``. escala sends the traceback as text anyway, so the exception is pickled as
    plain pickle would in any other process.
    """
    failure = dump_exception(exc, where)
    if failure.payload is not None:
        table = {
            kind: reducer
            for kind, reducer in copyreg.dispatch_table.items()
            if not getattr(reducer, "__module__", "").startswith("tblib")
        }
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = table
        try:
            pickler.dump(exc)
            payload = buffer.getvalue()
            loads(payload)
        except Exception:
            pass  # keep what dump_exception made
        else:
            failure.payload = payload
    return failure


async def _forget(token: str) -> None:
    """Close the worker contexts of a finished run (on the worker's event loop)."""
    _worker.forget(token)


async def _kill_worker() -> None:
    """Stop this worker process at once: its nanny starts another."""
    os.kill(os.getpid(), 9)
