"""Ray mode: batches run as tasks on a Ray cluster.

One escala batch is one Ray task, which runs escala's own batch runner in a Ray worker
process, so batching and per-task error capture are those of processes mode. The function
(with whatever it carries: a ``functools.partial``'s large argument, a closure's data) is
cloudpickled once per run and put in Ray's object store (``ray.put``); every task refers
to it by its object reference::

    caller threads                     Ray (its core worker)                  Ray workers
    ──────────────                     ─────────────────────                  ───────────
    submit(batch):
      function: cloudpickle, ray.put once ───────────────────────────────▶ object store
      items: pickle (errors name the item)
      _run_batch.remote(fn_ref, items) ──────────────────────────────────▶ run_batch
    collector thread ("escala-ray-collector") ◀── ref.future() done ◀──── result bytes
      sink(Done); past a timed task's deadline: ray.cancel(ref, force=True)

The engine above bounds what is in flight (the window); here at most one task per CPU of
the cluster (or ``workers``, if fewer) is handed to Ray at once, and the rest wait in a
queue, so a task handed over starts at once on a free worker.

A task past its timeout is stopped with ``ray.cancel(ref, force=True)``, which kills the
Ray worker process running it (``stopped=True``); Ray starts another for the next task
(the next task pays that start, about a second). The timeout counts from the moment escala
hands the task to Ray: on a cluster that other jobs keep busy, time spent waiting for a
CPU counts against it.

A task that kills its worker (``os._exit``, a segfault, the OOM killer) is not run again
by Ray (``max_retries=0``): a single task becomes :class:`~escala.WorkerDied`
(``ray.exceptions.WorkerCrashedError``), a batch is run again one task at a time to find
the culprit. Escala's ``retries`` decide whether it runs again. An application error is
caught inside the worker and comes back with its traceback, as in processes mode.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions

from .._errors import EscalaError, TaskTimeout, WorkerDied
from .._worker.cpu import usable_cpus
from .._worker.messages import Batch, Sink
from .._worker.pickling import dump_function, dumps
from .._worker.wire import Reply
from ._remote import Piece, RemoteBackend, WorkerState

__all__ = ["RayBackend"]

#: Worker contexts (initializer state, event loop) a Ray worker keeps before closing the
#: oldest: Ray workers outlive a run on a cluster escala did not start.
CONTEXT_CACHE = 16
#: Seconds to wait for a TCP connection to a cluster's address before ``ray.init``.
CONNECT_TIMEOUT = 5.0

# the worker died, or its node did: nothing the function raised
_DIED = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
)
# the task's inputs or result were lost with a node: run it again
_LOST = (ray.exceptions.ObjectLostError, ray.exceptions.TaskCancelledError)


# The Ray connection that escala made in this process (a local Ray it started, or an
# address it connected to), shared by every backend that runs while it is up (Ray allows
# one per process) and shut down when the last of them is done. A ray.init of the caller's
# own is used and never shut down.
_local_lock = threading.Lock()
_local_users = 0


@dataclass(eq=False)
class _Piece(Piece):
    """One Ray task: a whole batch, or (with a timeout) one task of it."""

    args: tuple[Any, ...] = ()
    ref: Any = None
    started: float | None = None  # when it was handed to Ray


class RayBackend(RemoteBackend):
    """Run batches as tasks on a Ray cluster.

    Args:
        workers: tasks to keep running at once; ``0`` means the cluster's CPUs.
        address: the cluster's address (``"10.0.0.5:6379"``, ``"auto"``). ``None`` uses
            this process's Ray connection if ``ray.init`` was called, else starts a local
            cluster with one CPU per usable core, shut down again at shutdown.
        initializer: run once in each Ray worker process before its first task of this run.
        initargs: its arguments.
    """

    batches_pay = True  # a Ray task costs about a millisecond: batch small tasks
    engine = "Ray"

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
        self._init = dump_function((initializer, initargs)) if initializer else None
        self._local = False  # this backend uses a Ray connection that escala made
        if ray.is_initialized() and not (address is None or address == "auto"):
            current = ray.get_runtime_context().gcs_address
            if address.removeprefix("ray://") != current:
                raise EscalaError(
                    f"this process is already connected to the Ray cluster at {current!r}"
                    f" and Ray allows one per process: address={address!r} cannot be "
                    "reached from here. Leave address out to run on the current one."
                )
        elif address is not None:
            try:
                _check_reachable(address)
                self._local = _acquire(
                    address=address, configure_logging=False, log_to_driver=False
                )
            except (ConnectionError, OSError, ValueError) as exc:
                raise EscalaError(
                    f"could not reach the Ray cluster at {address!r}: "
                    f"{str(exc).strip().rstrip('.')}. Start one "
                    "(ray start --head), check the address, or leave address out to start "
                    "a local cluster."
                ) from exc
        # a backend dropped before shutdown (an imap never iterated) lets its connection go
        self._finalizer = weakref.finalize(self, _release) if self._local else None
        if workers:
            self._setup(workers)
        elif ray.is_initialized():
            self._setup(_cpus())
        else:
            self._setup(usable_cpus())
        self._pieces: dict[int, _Piece] = {}  # handed to Ray, by id
        # completions for the collector; () wakes it for a new deadline, None stops it
        self._done: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._init_ref: Any = None
        self._collector: threading.Thread | None = None
        self._remote: Any = None

    # -- caller side ----------------------------------------------------------------

    def start(self) -> None:
        if not self._local and _acquire(
            num_cpus=self.workers,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        ):
            self._local = True
            self._finalizer = weakref.finalize(self, _release)
        self._remote = ray.remote(max_retries=0, retry_exceptions=False)(_run_batch)
        # as many tasks at once as asked for (``workers``), never more than there are CPUs
        self._cpus = _cpus()
        self._slots = max(1, min(self.workers, self._cpus))
        if self._init is not None:
            self._init_ref = ray.put(self._init)
        self._collector = threading.Thread(
            target=self._collect, name="escala-ray-collector", daemon=True
        )
        self._collector.start()

    def capacity(self) -> int:
        return _cpus()

    def _room(self, piece: _Piece) -> int:
        """Pieces without a timeout go two per CPU: a CPU that finishes a task finds the
        next one waiting in Ray's scheduler (which gives it to whichever CPU frees first,
        on any node) instead of idling for the round trip to this process, measured at
        5-6 % of the wall time of 75 ms tasks on 2 CPUs. A piece with a timeout goes only
        to a free CPU, so that its clock counts its run, not a wait in Ray's queue; and
        when ``workers=`` asked for fewer than the cluster's CPUs, a waiting task would
        run on another CPU at once, so then one per slot too."""
        if piece.whole.batch.call.timeout is not None or self._slots < self._cpus:
            return self._slots  # fewer than all CPUs asked for (workers=): no more at once
        return 2 * self._slots

    def submit(self, batch: Batch, sink: Sink) -> None:
        accepted = self._accept(batch, sink)
        if accepted is None:
            return
        whole, fn_ref, items = accepted
        size = len(batch.items)
        if batch.call.timeout is None:
            pieces = [(0, size, items)]
        else:
            pieces = [(pos, 1, dumps([item])) for pos, item in enumerate(batch.items)]
        whole.left = len(pieces)
        with self._lock:
            for start, count, data in pieces:
                indices = list(batch.indices[start : start + count])
                args = (fn_ref, self._init_ref, self._token, int(batch.call.apply), indices, data)
                self._queue.append(_Piece(whole, start, count, args))
        self._pump()

    def _pump(self) -> None:
        """Hand queued pieces to Ray while a CPU is free, or about to be (``_room``): a task
        with a timeout starts as soon as it is handed over, so its clock counts its run;
        the engine's window bounds what waits here."""
        while True:
            with self._lock:
                if not self._queue or len(self._pieces) >= self._room(self._queue[0]):
                    return
                piece = self._queue.popleft()
                self._pieces[id(piece)] = piece
                piece.started = time.monotonic()
                piece.ref = self._remote.remote(*piece.args)
                piece.args = ()
            if piece.whole.batch.call.timeout is not None:
                self._done.put(())  # a new deadline for the collector
            piece.ref.future().add_done_callback(lambda f, p=piece: self._done.put((p, f)))

    def _store(self, data: bytes) -> Any:
        """Put a cloudpickled function in Ray's object store; return its reference."""
        return ray.put(data)

    def cancel(self, sink: Sink) -> None:
        # queued pieces are dropped; running ones finish unreported (a Ray task cannot be
        # interrupted without killing its worker, which shutdown(cancel=True) does)
        with self._lock:
            self._drop_queued(sink)

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
            else:
                self._changed.wait_for(lambda: not (self._pieces or self._queue or self._reporting))
        if cancel and not (self._local and _local_users == 1):  # else ray.shutdown does it
            for piece in pieces:
                try:
                    ray.cancel(piece.ref, force=True)
                except Exception:  # finished meanwhile, or the cluster is gone
                    pass
        if self._collector is not None and self._collector is not threading.current_thread():
            self._done.put(None)
            self._collector.join()
            self._collector = None
        self._shipped.clear()
        self._init_ref = None
        if self._finalizer is not None:
            self._finalizer()  # once: shuts Ray down if this was its last user
            self._local = False

    async def aclose(self, *, cancel: bool) -> None:
        # waiting for Ray's tasks and shutting Ray down block: off the loop
        await asyncio.to_thread(self.shutdown, cancel=cancel)

    # -- completions and deadlines (on the collector thread) ---------------------------

    def _collect(self) -> None:
        while True:
            with self._lock:
                wake = self._next_deadline()
            try:
                got = self._done.get(timeout=None if wake is None else max(0.0, wake))
            except queue.Empty:
                pass
            else:
                if got is None:
                    return
                if got:
                    self._piece_done(*got)
            self._enforce()

    def _next_deadline(self) -> float | None:
        now = time.monotonic()
        wake: float | None = None
        for piece in self._pieces.values():
            timeout = piece.whole.batch.call.timeout
            if timeout is None or piece.started is None:
                continue
            due = piece.started + timeout - now
            wake = due if wake is None else min(wake, due)
        return wake

    def _enforce(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [p for p in self._pieces.values() if _overdue(p, now)]
            for piece in late:
                del self._pieces[id(piece)]
        for piece in late:
            self._stop(piece)
        if late:
            self._pump()

    def _key(self, piece: _Piece) -> int:
        return id(piece)

    def _report(self, piece: _Piece, future: Any, unwanted: bool) -> None:
        if unwanted:
            return  # it ran to its end, unreported (see cancel)
        try:
            reply: Reply = future.result()
        except _DIED as exc:
            self._killed(piece, exc)
            return
        except _LOST:
            self._lose(piece)
            return
        except Exception as exc:
            self._failed(piece, exc)
            return
        self._decode(piece, reply)

    def _killed(self, piece: _Piece, exc: BaseException) -> None:
        """The Ray worker running a piece died: blame its task, or find the culprit."""
        if self._split(piece):
            return
        error = WorkerDied(
            piece.whole.batch.indices[piece.start],
            worker="Ray worker",
            exitcode=None,
            pid=0,
            how=f"died ({type(exc).__name__}); Ray does not say how a worker ended: its "
            "raylet's log does",
        )
        error.__cause__ = exc
        self._fill(piece, error)

    def _stop(self, piece: _Piece) -> None:
        """Kill the Ray worker process running an overrunning task."""
        timeout = piece.whole.batch.call.timeout
        assert timeout is not None
        try:
            ray.cancel(piece.ref, force=True, recursive=False)
        except Exception as exc:
            how = (
                f"it could not be stopped ({type(exc).__name__}: {exc}), so escala stopped "
                "waiting instead: the task goes on in its Ray worker until the function returns"
            )
            stopped = False
        else:
            how = "its Ray worker was killed (ray.cancel(force=True)) and Ray starts another"
            stopped = True
        index = piece.whole.batch.indices[piece.start]
        error = TaskTimeout(index, timeout, stopped=stopped, how=how, advise=False)
        self._fill(piece, error)


def _overdue(piece: _Piece, now: float) -> bool:
    timeout = piece.whole.batch.call.timeout
    return timeout is not None and piece.started is not None and piece.started + timeout <= now


def _acquire(**init: Any) -> bool:
    """Use the Ray connection escala made, or make one (``ray.init(**init)``); return
    False where the caller's own ``ray.init`` connection is to be used instead."""
    global _local_users
    with _local_lock:
        if _local_users:
            _local_users += 1
            return True
        if ray.is_initialized():
            return False
        ray.init(**init)
        _local_users = 1
        return True


def _release() -> None:
    """One user of escala's Ray connection is done: the last one shuts it down."""
    global _local_users
    with _local_lock:
        _local_users -= 1
        if not _local_users:
            ray.shutdown()


def _cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _check_reachable(address: str) -> None:
    """Try a TCP connection to a Ray address; raise ``OSError`` if nothing answers.

    ``ray.init`` waits for an unreachable cluster for minutes (its GCS reconnect timeout),
    so a mistyped address would look like a hang; a connection first fails it in seconds.
    ``"auto"`` and forms Ray reads elsewhere are left to Ray.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
        pass


# -- inside a Ray worker --------------------------------------------------------------

_worker = WorkerState(CONTEXT_CACHE)


def _run_batch(
    fn_bytes: bytes,
    init: bytes | None,
    token: str,
    apply: int,
    indices: list[int],
    items_bytes: bytes,
) -> Reply:
    """Run one batch in a Ray worker; return what :meth:`RayBackend._report` reads.
    Nothing the task raises escapes: failures travel back in the reply."""
    where = f"Ray worker (pid {os.getpid()})"
    return _worker.run(fn_bytes, init, token, apply, indices, items_bytes, where)
