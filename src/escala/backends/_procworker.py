"""The code that runs inside each worker process of processes mode.

Kept apart from :mod:`escala.backends.processes` so that a worker imports as little as
possible: this module, the pickling helpers and the user's function.

A worker talks to its parent over one duplex pipe, in typed messages (:class:`Msg`):

    parent                                   worker
      │ ── RUN (batch id, fn, items) ────────▶ │  runs the tasks in order, writing the
      │                                        │  current (batch, position, start time)
      │ ◀──────────── DONE (values, errors) ── │  into a shared-memory slot before each
      │ ── STOP ─────────────────────────────▶ │  exits                           task
      │ ◀─────── READY / INIT_FAILED (once) ── │  after the initializer, at start-up

The slot lets the parent see which task a worker is on without any message: it times out
that task, and blames it when the worker dies.
"""

from __future__ import annotations

import enum
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Msg", "WorkerSetup", "worker_main"]

# Slot layout: two doubles. SLOT_TASK holds ``batch_id * POS_SPAN + position`` of the task
# running now; SLOT_START its start time (``time.monotonic``, the same clock system-wide),
# written first, and only for batches with a timeout. WorkerContext.run_batch writes them.
SLOT_TASK, SLOT_START = 0, 1
POS_SPAN = 1 << 20  # batches hold fewer tasks than this (Options caps ``batch``)

#: How often a worker checks its parent by pid, as a backstop to the parent-death pipe.
ORPHAN_CHECK = 5.0


class Msg(enum.IntEnum):
    """Message kinds on a worker's pipe."""

    READY = 1  # worker -> parent: initialized, waiting for work
    INIT_FAILED = 2  # worker -> parent: the initializer raised (payload: Failure)
    RUN = 3  # parent -> worker: (batch id, fn id, fn bytes, apply, forget, timed, indices, items)
    DONE = 4  # worker -> parent: (batch id, values bytes, failures, busy seconds, load error)
    STOP = 5  # parent -> worker: exit now


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What a worker needs to start, sent once when it is created."""

    parent_pid: int
    native_threads: int
    cap_loaded: bool  # native pools inherited through fork exceed native_threads
    initializer: bytes | None  # cloudpickled (initializer, initargs)
    parent_alive: Connection  # read end of a pipe only the parent writes to: EOF = it died
    inherited_fd: int | None  # under fork, the copy of the write end to close at once


def worker_main(conn: Connection, slot: Any, setup: WorkerSetup) -> None:
    """Serve batches from the parent until told to stop or the parent is gone."""
    # Own process group: the parent can kill this worker together with anything its task
    # started, and a Ctrl-C in the terminal goes to the parent alone, which then stops us.
    try:
        os.setpgid(0, 0)
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Under fork, the parent's objects come along, copy-on-write, and so do its GC counters,
    # often one step from a full collection: the first allocations here would walk the
    # whole inherited heap, writing every object's GC header and copying page after page
    # (milliseconds in a large program). Frozen, those objects are left out of collections.
    gc.freeze()
    if setup.inherited_fd is not None:
        try:
            os.close(setup.inherited_fd)
        except OSError:
            pass
    _watch_parent(setup.parent_pid, setup.parent_alive)

    from .._worker.context import WorkerContext
    from .._worker.cpu import cap_native_threads
    from .._worker.pickling import dump_exception, dump_values, dumps, loads

    cap_native_threads(setup.native_threads, loaded=setup.cap_loaded)
    where = f"worker process {os.getpid()}"
    ctx = WorkerContext()
    try:
        if setup.initializer is not None:
            initializer, initargs = loads(setup.initializer)
            ctx = WorkerContext(initializer, initargs)
        ctx.enter()
        ctx.initialize()
    except Exception as exc:
        conn.send_bytes(dumps((Msg.INIT_FAILED, dump_exception(exc, where))))
        return
    conn.send_bytes(dumps((Msg.READY,)))

    from .._worker.messages import Batch, Call, Failure

    functions: dict[int, Callable[..., Any]] = {}
    # Functions that failed to load: the parent counts them as sent, so later batches
    # come without the bytes, and get the same failure again.
    unloadable: dict[int, Failure] = {}

    cells = memoryview(slot).cast("B").cast("d")  # faster to write than the ctypes array

    while True:
        try:
            message = loads(conn.recv_bytes())
        except (EOFError, OSError):
            break  # the parent closed the pipe: nothing more to do
        if message[0] != Msg.RUN:
            break
        _, batch_id, fn_id, fn_bytes, apply, forget, timed, indices, items_bytes = message
        if forget:
            functions.clear()
            unloadable.clear()
        failure: Failure | None = None
        try:
            if fn_bytes is not None:
                try:
                    functions[fn_id] = loads(fn_bytes)
                except BaseException as exc:
                    unloadable[fn_id] = dump_exception(exc, where)
            failure = unloadable.get(fn_id)
            items = loads(items_bytes)
        except BaseException as exc:  # an argument that cannot be rebuilt here
            failure = failure or dump_exception(exc, where)
        if failure is not None:
            conn.send_bytes(dumps((Msg.DONE, batch_id, None, None, 0.0, failure)))
            continue
        batch = Batch(Call(functions[fn_id], apply), indices, items, id=batch_id)
        values, errors, busy = ctx.run_batch(
            batch, slot=cells, slot_base=float(batch_id * POS_SPAN), timed=timed
        )
        failures = (
            {pos: dump_exception(exc, where) for pos, exc in errors.items()} if errors else None
        )
        values_bytes, bad = dump_values(values, "result", lambda pos: f"task #{indices[pos]}")
        if bad:
            failures = {**(failures or {}), **bad}
        conn.send_bytes(dumps((Msg.DONE, batch_id, values_bytes, failures, busy, None)))
    ctx.close()


def _watch_parent(parent_pid: int, parent_alive: Connection) -> None:
    """Exit, with everything this worker started, if the parent dies.

    Workers sit in their own process group, so nothing kills them with the parent; and a
    worker deep in a long task never reads its pipe, so it would not notice the parent
    going. A daemon thread waits, without holding the GIL, on a pipe whose only write end
    the parent holds: it reads end-of-file the moment the parent dies. Every few seconds
    it also checks that its parent is unchanged (under forkserver that is the fork server,
    which exits with the owner) and that the owner lives, in case another process kept a
    copy of the write end (a child the user forked).
    """
    first_parent = os.getppid()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - exists, owned by someone else
            return True
        return True

    def watch() -> None:
        try:
            while not parent_alive.poll(ORPHAN_CHECK):
                if os.getppid() != first_parent or not alive(parent_pid):
                    break
        except OSError:
            pass
        try:
            os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="escala-orphan-watch", daemon=True).start()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("this module is started by escala, not run directly")
