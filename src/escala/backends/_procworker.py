"""The code that runs inside each worker process of processes mode.

Kept apart from :mod:`escala.backends.processes` so that a worker imports as little as
possible: this module, the pickling helpers and the user's function.

A worker talks to its parent over one duplex pipe, in the typed messages of
:mod:`escala._worker.wire`::

    parent                                   worker
      │ ── Run (batch id, fn, items) ────────▶ │  runs the tasks in order, writing the
      │                                        │  current (batch, position, start time)
      │ ◀──── Ran (values, errors) or ──────── │  into its shared-memory slot before each
      │       Unloadable (why)                 │  task
      │ ── Stop ─────────────────────────────▶ │  exits
      │ ◀──────── Ready / InitFailed (once) ── │  after the initializer, at start-up

The slot (:mod:`escala._worker.slots`) lets the parent see which task a worker is on
without any message: it times out that task, and blames it when the worker dies.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .._worker import slots
from .._worker.context import WorkerContext
from .._worker.cpu import cap_native_threads
from .._worker.messages import Batch, Call, Failure
from .._worker.pickling import dump_exception, dump_values, dumps, loads
from .._worker.wire import InitFailed, Ran, Ready, Run, Unloadable

__all__ = ["WorkerSetup", "worker_main"]

#: How often a worker checks its parent by pid, as a backstop to the parent-death pipe.
ORPHAN_CHECK = 5.0


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

    cap_native_threads(setup.native_threads, loaded=setup.cap_loaded)
    where = f"worker process {os.getpid()}"
    ctx = WorkerContext()
    try:
        if setup.initializer is not None:
            initializer, initargs = loads(setup.initializer)
            ctx = WorkerContext(initializer, initargs)
        ctx.enter()
        ctx.initialize()
    except BaseException as exc:  # SIGINT is ignored here: a KeyboardInterrupt is its own
        conn.send_bytes(dumps(InitFailed(dump_exception(exc, where))))
        return
    conn.send_bytes(dumps(Ready()))

    functions: dict[int, Callable[..., Any]] = {}
    # Functions that failed to load: the parent counts them as sent, so later batches
    # come without the bytes, and get the same failure again.
    unloadable: dict[int, Failure] = {}

    cells = slots.view(slot)

    while True:
        try:
            run = loads(conn.recv_bytes())
        except (EOFError, OSError):
            break  # the parent closed the pipe: nothing more to do
        if type(run) is not Run:
            break  # Stop
        if run.forget:
            functions.clear()
            unloadable.clear()
        failure: Failure | None = None
        try:
            if run.fn is not None:
                try:
                    functions[run.fn_id] = loads(run.fn)
                except BaseException as exc:
                    unloadable[run.fn_id] = dump_exception(exc, where)
            failure = unloadable.get(run.fn_id)
            items = loads(run.items)
        except BaseException as exc:  # an argument that cannot be rebuilt here
            failure = failure or dump_exception(exc, where)
        if failure is not None:
            conn.send_bytes(dumps(Unloadable(failure)))
            continue
        indices = run.indices
        batch = Batch(Call(functions[run.fn_id], run.apply), indices, items, id=run.batch_id)
        values, errors, busy = ctx.run_batch(
            batch, slot=cells, slot_base=slots.base(run.batch_id), timed=run.timed
        )
        failures = (
            {pos: dump_exception(exc, where) for pos, exc in errors.items()} if errors else None
        )
        values_bytes, bad = dump_values(values, "result", lambda pos: f"task #{indices[pos]}")
        if bad:
            failures = {**(failures or {}), **bad}
        conn.send_bytes(dumps(Ran(values_bytes, failures, busy)))
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
            if os.getpgid(0) == os.getpid():  # never the parent's group, had setpgid failed
                os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="escala-orphan-watch", daemon=True).start()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("this module is started by escala, not run directly")
