"""Processes mode: worker processes, for CPU-bound Python that holds the GIL.

Why not ``multiprocessing.Pool`` or ``ProcessPoolExecutor``: neither can stop one runaway
task (a timeout there leaves the worker running), and neither says which task a dead
worker was running. Both need the parent to know, at any instant, which task each worker
is on. So each worker here has its own pipe and a two-number shared-memory slot, and one
manager thread in the parent watches them all::

    caller threads                manager thread ("escala-manager")            workers
    ──────────────                ─────────────────────────────────            ───────
    submit(batch):                wait on: wake pipe, every worker's pipe,
      pickle items (errors          every worker's exit sentinel, and the
      name the item) ──▶ pending    earliest task deadline
      deque ── wake ──▶           dispatch: pending batch ──▶ an idle worker ──pipe──▶ run
                                  Ran on a pipe ──▶ unpickle ──▶ sink(Done) ◀──pipe── reply
                                  sentinel fired ──▶ read the slot: blame the task
                                      running, mark the rest lost, start a new worker
                                  deadline passed ──▶ kill the worker's process group

The messages on the pipes are those of :mod:`escala._worker.wire`; the slot's layout is
:mod:`escala._worker.slots`. Each worker leads its own process group, so a timeout kills
whatever the task started too, and Ctrl-C reaches only the parent, which then stops the
workers itself.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing as mp
import multiprocessing.connection as mpc
import multiprocessing.util
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._errors import (
    BrokenWorker,
    EscalaError,
    PoolClosed,
    RemoteTraceback,
    SendError,
    TaskTimeout,
    WorkerDied,
    describe_exit,
)
from .._worker import slots
from .._worker.cpu import loaded_pools_exceed, usable_cpus
from .._worker.messages import Batch, Done, Failure, Sink
from .._worker.pickling import dump_function, dump_values, dumps, loads
from .._worker.wire import FromWorker, InitFailed, Ran, Ready, Run, Stop, Unloadable
from ._procworker import WorkerSetup, worker_main

__all__ = ["ProcessBackend"]

#: Distinct functions kept pickled (and cached in workers) before the caches are reset.
FUNCTION_CACHE = 256
#: Seconds a worker gets to exit after SIGTERM before SIGKILL, when a run is cancelled.
TERM_GRACE = 0.3
#: Seconds to wait for an idle worker to exit after STOP before killing it.
STOP_GRACE = 5.0


@dataclass(eq=False)
class _Packed:
    """A batch ready for a worker: its function's number and bytes, its items pickled."""

    batch: Batch
    sink: Sink
    fn_id: int
    fn_bytes: bytes
    items: bytes


@dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess
    conn: mpc.Connection
    cells: memoryview[float]  # the slot's doubles (escala._worker.slots)
    slot: Any  # the shared memory itself, kept alive with the view
    capacity: int = 0  # bytes a message may have to be queued without blocking the manager
    ready: bool = False
    current: _Packed | None = None  # the batch the worker is on
    queued: _Packed | None = None  # the next batch, already in its pipe
    sent_at: float = 0.0  # when ``current`` became the worker's current batch
    functions: set[int] = field(default_factory=set)
    forget: bool = False
    killed_for: tuple[int, float] | None = None  # (position, timeout) when timed out


_live: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop pools the program forgot to close, so interpreter exit does not hang on them."""
    for backend in list(_live):
        backend.shutdown(cancel=True)


class ProcessBackend:
    """Run batches in ``workers`` worker processes.

    Args:
        workers: how many worker processes.
        initializer: run once in each worker before its first task.
        initargs: its arguments.
        start_method: ``"fork"``, ``"forkserver"`` or ``"spawn"``; ``None`` is fork on
            Linux (fast, and functions from ``__main__`` need no re-import) and spawn
            elsewhere.
    """

    batches_pay = True

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        start_method: str | None = None,
        **_: Any,
    ) -> None:
        self.workers = workers
        method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
        self._ctx: Any = mp.get_context(method)
        if method == "forkserver":
            self._ctx.set_forkserver_preload(["escala.backends._procworker"])
        self._initializer = (
            dump_function((initializer, initargs)) if initializer is not None else None
        )
        # Only this process writes to (in fact, never writes to) this pipe: when it dies,
        # the workers read end-of-file and exit. Forked workers close their inherited copy
        # of the write end first thing, or they would keep each other's pipe open.
        self._alive_r, self._alive_w = self._ctx.Pipe(duplex=False)
        native_threads = max(1, usable_cpus() // workers)
        self._setup = WorkerSetup(
            parent_pid=os.getpid(),
            native_threads=native_threads,
            # only fork passes loaded libraries on; other start methods load them afresh,
            # after the environment variables are set
            cap_loaded=method == "fork" and loaded_pools_exceed(native_threads),
            initializer=self._initializer,
            parent_alive=self._alive_r,
            inherited_fd=self._alive_w.fileno() if method == "fork" else None,
        )
        self._lock = threading.Lock()
        self._pending: deque[_Packed] = deque()
        self._procs: list[_Worker] = []
        self._functions: dict[int, tuple[Callable[..., Any], int, bytes]] = {}
        self._next_fn_id = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._manager: threading.Thread | None = None
        self._closing = False
        self._cancel = False
        self._broken: BaseException | None = None
        self._early_deaths = 0
        self.restarts = 0

    # -- caller side ----------------------------------------------------------------

    def start(self) -> None:
        self._manager = threading.Thread(target=self._manage, name="escala-manager", daemon=True)
        try:
            for _ in range(self.workers):
                self._procs.append(self._spawn())
        except BaseException:
            # Out of processes or memory, or Ctrl-C: stop the workers already started.
            self._cancel = self._closing = True
            self._stop_workers()
            self._close_pipes()
            raise
        self._manager.start()
        _live.add(self)

    @property
    def ready(self) -> bool:
        """Whether every worker has started and said so (its initializer run)."""
        return bool(self._procs) and all(p.ready for p in list(self._procs))

    def submit(self, batch: Batch, sink: Sink) -> None:
        if self._closing:
            raise PoolClosed()
        fn_id, fn_bytes = self._function(batch.call.fn)
        items, bad = dump_values(batch.items, "argument", lambda pos: f"task #{batch.indices[pos]}")
        if bad:
            # Report the items that cannot be sent; the scheduler sends the others again.
            lost = [pos for pos in range(len(batch.items)) if pos not in bad]
            sink(Done(batch, [None] * len(batch.items), bad, lost))
            return
        with self._lock:
            if self._broken is not None:
                broken = self._broken
            else:
                self._pending.append(_Packed(batch, sink, fn_id, fn_bytes, items))
                broken = None
        if broken is not None:
            _fail_all(batch, sink, broken)
            return
        self._wake()

    def _function(self, fn: Callable[..., Any]) -> tuple[int, bytes]:
        with self._lock:
            known = self._functions.get(id(fn))
            if known is not None and known[0] is fn:
                return known[1], known[2]
        data = dump_function(fn)
        with self._lock:
            if len(self._functions) >= FUNCTION_CACHE:
                self._functions.clear()
                for proc in self._procs:
                    proc.functions.clear()
                    proc.forget = True
            self._next_fn_id += 1
            self._functions[id(fn)] = (fn, self._next_fn_id, data)
            return self._next_fn_id, data

    def cancel(self, sink: Sink) -> None:
        with self._lock:
            kept = [packed for packed in self._pending if packed.sink is not sink]
            self._pending.clear()
            self._pending.extend(kept)

    def shutdown(self, *, cancel: bool) -> None:
        with self._lock:
            if self._closing and not (cancel and not self._cancel):
                already = True
            else:
                already = False
                self._closing = True
                self._cancel = self._cancel or cancel
        self._wake()
        manager = self._manager
        if (
            manager is not None
            and manager.ident is not None
            and manager is not threading.current_thread()
        ):
            manager.join()
        if not already:
            _live.discard(self)

    async def aclose(self, *, cancel: bool) -> None:
        # joining the manager thread, and through it the workers, blocks: off the loop
        await asyncio.to_thread(self.shutdown, cancel=cancel)

    def _wake(self) -> None:
        with self._lock:  # the manager closes the pipe under the lock: never write to a
            if self._wake_w < 0:  # closed descriptor, whose number may be reused
                return
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass  # the pipe is full: a wake-up is already pending

    # -- worker processes -----------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        slot = slots.allocate(self._ctx)
        process = self._ctx.Process(
            target=worker_main,
            args=(child_conn, slot, self._setup),
            name="escala-worker",
            daemon=False,  # daemonic processes may not start children; tasks may need to
        )
        process.start()
        child_conn.close()
        return _Worker(
            process, parent_conn, slots.view(slot), slot, capacity=_queue_capacity(parent_conn)
        )

    def _kill(self, proc: _Worker, sig: int = signal.SIGKILL) -> None:
        pid = proc.process.pid
        try:
            os.killpg(pid, sig)  # the worker leads its own group: take its children too
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)  # it died, or had not yet made its own group
            except ProcessLookupError:
                pass

    # -- manager thread -------------------------------------------------------------

    def _manage(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            error = EscalaError(f"escala's process manager failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            self._break(error)
        finally:
            self._stop_workers()
            self._close_pipes()

    def _close_pipes(self) -> None:
        with self._lock:
            if self._wake_w >= 0:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
        self._alive_r.close()
        self._alive_w.close()

    def _serve(self) -> None:
        while True:
            self._dispatch()
            with self._lock:
                busy = bool(self._pending) or any(p.current for p in self._procs)
                if self._closing and (self._cancel or not busy or self._broken is not None):
                    return
            deadline = self._next_deadline()
            wait_for = None if deadline is None else max(0.0, deadline - time.monotonic())
            by_key: dict[Any, _Worker] = {}
            for proc in self._procs:
                by_key[proc.conn] = proc
                by_key[proc.process.sentinel] = proc
            ready = mpc.wait([self._wake_r, *by_key], wait_for)
            dead: list[_Worker] = []
            for key in ready:
                if key == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                proc = by_key[key]
                if key is proc.conn:
                    if not self._receive(proc):
                        dead.append(proc)
                elif proc not in dead:
                    dead.append(proc)
            for proc in dead:
                self._died(proc)
            self._enforce_timeouts()

    def _dispatch(self) -> None:
        """Give idle workers a batch each, then queue one more behind each busy worker.

        The queued batch saves the worker a round trip through this thread between
        batches. It is only sent when its message fits the pipe's buffer, so the write
        never waits for the worker: a manager blocked on a busy worker's pipe could not
        read the results that worker is blocked sending (the classic pipe deadlock). And
        only batches of several tasks are queued: the scheduler makes those only for tasks
        measured short (or when the caller fixed a batch size), while a single task may
        be long, and one queued behind a long task would wait although another worker
        is free.
        """
        for prefetch in (False, True):
            for proc in self._procs:
                if not proc.ready or proc.killed_for is not None:
                    continue
                if (proc.queued if prefetch else proc.current) is not None:
                    continue
                if prefetch and proc.current is None:
                    continue
                with self._lock:
                    if not self._pending:
                        return
                    packed = self._pending[0]
                    known = packed.fn_id in proc.functions
                    size = len(packed.items) + (0 if known else len(packed.fn_bytes))
                    if prefetch and (size > proc.capacity or len(packed.batch.items) < 2):
                        return  # the head of the queue is not for queueing: keep order
                    self._pending.popleft()
                    forget, proc.forget = proc.forget, False
                    proc.functions.add(packed.fn_id)
                self._send(proc, packed, known=known, forget=forget, prefetch=prefetch)

    def _send(
        self, proc: _Worker, packed: _Packed, *, known: bool, forget: bool, prefetch: bool
    ) -> None:
        batch = packed.batch
        message = dumps(
            Run(
                batch_id=batch.id,
                fn_id=packed.fn_id,
                fn=None if known else packed.fn_bytes,
                apply=batch.call.apply,
                forget=forget,
                timed=batch.call.timeout is not None,
                indices=batch.indices,
                items=packed.items,
            )
        )
        if prefetch:
            proc.queued = packed
        else:
            proc.current, proc.sent_at = packed, time.monotonic()
        try:
            proc.conn.send_bytes(message)
        except OSError:
            pass  # it died: its sentinel fires next, and the batch is handled there

    def _receive(self, proc: _Worker) -> bool:
        """Handle one message from a worker; return False if the worker is gone."""
        try:
            message: FromWorker = loads(proc.conn.recv_bytes())
        except (EOFError, OSError):
            return False
        match message:
            case Ready():
                proc.ready = True
                self._early_deaths = 0
            case InitFailed(failure):
                error = BrokenWorker.initializer(
                    f"{failure.type_name}: {failure.message}", where="a worker process"
                )
                error.__cause__ = RemoteTraceback(failure.traceback)
                self._break(error)
            case Ran() | Unloadable():
                self._finished(proc, message)
        return True

    def _finished(self, proc: _Worker, reply: Ran | Unloadable) -> None:
        packed, proc.current, proc.queued = proc.current, proc.queued, None
        if proc.current is not None:
            proc.sent_at = time.monotonic()  # the worker moved straight on to it
        if packed is None:  # pragma: no cover - a reply nobody asked for
            return
        if isinstance(reply, Unloadable):
            self._unloadable(packed, reply.failure, "could not be loaded in the worker process")
            return
        try:
            values = loads(reply.values)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            failure = Failure(type_name=type(exc).__name__, message=str(exc), traceback=text)
            self._unloadable(packed, failure, "could not be rebuilt in the caller", result=True)
            return
        packed.sink(Done(packed.batch, values, reply.failures, busy=reply.busy))

    def _unloadable(
        self, packed: _Packed, failure: Failure, why: str, result: bool = False
    ) -> None:
        """A batch failed as a whole: find the culprit alone, or blame the single task."""
        batch = packed.batch
        if len(batch.items) > 1:
            packed.sink(
                Done(
                    batch, [None] * len(batch.items), lost=list(range(len(batch.items))), split=True
                )
            )
            return
        error = SendError.unloadable(
            batch.indices[0],
            what="result" if result else "argument (or function)",
            why=why,
            error=f"{failure.type_name}: {failure.message}",
            workers="the worker process",
        )
        error.__cause__ = RemoteTraceback(failure.traceback)
        packed.sink(Done(batch, [None], {0: Failure(error=error)}))

    def _current(self, proc: _Worker) -> tuple[int | None, float]:
        """Return the position and start time of the task a worker is on, if it started."""
        batch_id, pos, start = slots.read(proc.cells)
        if proc.current is None or batch_id != proc.current.batch.id:
            return None, proc.sent_at  # it has not started this batch yet
        return pos, start  # pos None: somewhere in it, the worker did not track each task

    def _next_deadline(self) -> float | None:
        deadline: float | None = None
        for proc in self._procs:
            timeout = None if proc.current is None else proc.current.batch.call.timeout
            if timeout is None or proc.killed_for:
                continue
            _, start = self._current(proc)
            due = max(start, proc.sent_at) + timeout
            deadline = due if deadline is None else min(deadline, due)
        return deadline

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for proc in self._procs:
            timeout = None if proc.current is None else proc.current.batch.call.timeout
            if timeout is None or proc.killed_for:
                continue
            pos, start = self._current(proc)
            if max(start, proc.sent_at) + timeout <= now:
                proc.killed_for = (pos if pos is not None else 0, timeout)
                self._kill(proc)

    def _died(self, proc: _Worker) -> None:
        """A worker exited: account for its batch, then start another in its place."""
        proc.process.join(STOP_GRACE)
        exitcode = proc.process.exitcode
        self._procs.remove(proc)
        proc.conn.close()
        packed, queued = proc.current, proc.queued
        if packed is not None:
            self._report_death(proc, packed, exitcode)
        if queued is not None:  # never started: send it again elsewhere
            size = len(queued.batch.items)
            queued.sink(Done(queued.batch, [None] * size, lost=list(range(size))))
        if not proc.ready:
            self._early_deaths += 1
            if self._early_deaths > 2 * self.workers + 2:
                self._break(
                    BrokenWorker(
                        f"worker processes keep dying before their first task: the last "
                        f"{describe_exit(exitcode)}"
                    )
                )
        if not self._closing and self._broken is None:
            self._procs.append(self._spawn())
            self.restarts += 1

    def _report_death(self, proc: _Worker, packed: _Packed, exitcode: int | None) -> None:
        batch = packed.batch
        size = len(batch.items)
        pos, _ = self._current(proc)
        if proc.killed_for is not None:
            pos, timeout = proc.killed_for
            error: BaseException = TaskTimeout(
                batch.indices[pos],
                timeout,
                stopped=True,
                how=f"its worker process {proc.process.pid} was killed with its process group "
                "and replaced",
            )
        elif pos is None and size > 1:
            # It died loading the batch or somewhere in an untracked run: run each task
            # alone to find the culprit (which therefore runs twice).
            packed.sink(Done(batch, [None] * size, lost=list(range(size)), split=True))
            return
        else:
            pos = pos or 0
            error = WorkerDied(
                batch.indices[pos],
                worker=f"worker process {proc.process.pid}",
                exitcode=exitcode,
                pid=proc.process.pid,
            )
        lost = [p for p in range(size) if p != pos]
        packed.sink(Done(batch, [None] * size, {pos: Failure(error=error)}, lost))

    def _break(self, error: BaseException) -> None:
        """Fail everything queued and running: the workers cannot work."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = error
            stranded = list(self._pending)
            self._pending.clear()
        for proc in self._procs:
            stranded.extend(packed for packed in (proc.current, proc.queued) if packed is not None)
            proc.current = proc.queued = None
        for packed in stranded:
            _fail_all(packed.batch, packed.sink, error)

    def _stop_workers(self) -> None:
        """Stop every worker: politely when idle, by signal when cancelling or stuck."""
        procs, self._procs = self._procs, []
        if self._cancel or self._broken is not None:
            for proc in procs:
                self._kill(proc, signal.SIGTERM)
            deadline = time.monotonic() + TERM_GRACE
        else:
            for proc in procs:
                try:
                    proc.conn.send_bytes(dumps(Stop()))
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            proc.process.join(max(0.0, deadline - time.monotonic()))
            if proc.process.exitcode is None:
                self._kill(proc)
                proc.process.join()
            proc.conn.close()
            for packed in (proc.current, proc.queued):
                if packed is not None and not self._cancel:
                    _fail_all(packed.batch, packed.sink, PoolClosed("the pool was shut down"))


def _queue_capacity(conn: mpc.Connection) -> int:
    """Return how many bytes can wait in ``conn`` unread without a write blocking.

    The pipe is a Unix socket pair on Linux. Its send buffer is raised (the kernel caps it
    at ``net.core.wmem_max``) and half of what the kernel grants is used: buffer
    accounting includes bookkeeping beyond the payload.
    """
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:  # pragma: no cover - not a socket (another platform)
        return 0
    with sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        except OSError:  # pragma: no cover - not allowed: keep the default
            pass
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)) // 4


def _fail_all(batch: Batch, sink: Sink, error: BaseException) -> None:
    failure = Failure(error=error)
    sink(Done(batch, [None] * len(batch.items), dict.fromkeys(range(len(batch.items)), failure)))
