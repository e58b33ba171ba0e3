"""The default job store: one SQLite file, written by one thread in group commits.

A job is durable when ``submit`` returns (the service answers 202 only then), so every
commit must reach the disk: ``synchronous=FULL`` makes SQLite fsync the write-ahead log
on each COMMIT. An fsync costs from a fraction of a millisecond to tens of them, so one
commit per write would cap the service at that many writes per second however fast the
rest is. Instead, every write goes through one writer thread that commits whatever has
queued up meanwhile in ONE transaction, one fsync for the lot::

    coroutines (event loop)        writer thread (own connection)
    ─────────────────────────      ──────────────────────────────────────────
    submit ─┐                      take everything queued (≤ batch ops)
    claim  ─┼─> queue ───────────> BEGIN IMMEDIATE
    finish ─┤   (op, future)         SAVEPOINT; op 1; RELEASE    (a failing op
    submit ─┘                        SAVEPOINT; op 2; RELEASE     rolls back to its
       ^                             …                            savepoint: only its
       │                           COMMIT  (one fsync)            caller sees the error)
       └──── futures resolved <─── loop.call_soon_threadsafe(…)

The busier the service, the larger the groups: 1000 concurrent submits cost a handful of
commits. Reads (``get``, ``queued``, ``counts``, ``keys``) run on a second thread with
its own connection; WAL lets them proceed beside a write, so a read never waits behind a
large group. The event loop itself never touches SQLite.

Only one server may use a file at a time: ``open`` takes an exclusive ``flock`` on
``<path>.lock`` (holding the server's pid), which is what makes
``recover(all_others=True)`` safe at start-up. Tools that only add keys while a server
runs open the store with ``exclusive=False``. The lock file stays on disk after close.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ._common import (
    CANCELLED,
    JOB_COLUMNS,
    KEY_COLUMNS,
    Lifecycle,
    already_opened,
    at_least_one,
    count_states,
    database_error,
    encode_job,
    encode_outcome,
    job_from_row,
    key_row,
    key_taken,
    newer_schema,
    not_open,
)
from ._types import ApiKey, Job, JobState, NewJob, StoreError

__all__ = ["SQLiteStore"]

T = TypeVar("T")
_Loop = asyncio.AbstractEventLoop
_Op = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], _Loop]
_Queue = queue.SimpleQueue[_Op]

# _MIGRATIONS[i] takes the schema from version i to version i + 1 (PRAGMA user_version).
_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY, user TEXT NOT NULL, task TEXT NOT NULL,
            args TEXT NOT NULL, kwargs TEXT NOT NULL, priority INTEGER NOT NULL,
            idempotency_key TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL,
            result TEXT, error TEXT, owner TEXT, lease_until REAL)""",
        "CREATE INDEX jobs_state ON jobs (state, created_at)",
        """CREATE UNIQUE INDEX jobs_idempotency ON jobs (user, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        """CREATE TABLE api_keys (
            user TEXT PRIMARY KEY, key_hash TEXT NOT NULL, weight REAL NOT NULL,
            rate REAL, burst INTEGER, created_at REAL NOT NULL)""",
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)

_GET = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
_SELECT_KEY = f"SELECT {JOB_COLUMNS} FROM jobs WHERE user = ? AND idempotency_key = ?"
_INSERT = (
    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?, "
    f"NULL, NULL, NULL, NULL, NULL, NULL) RETURNING {JOB_COLUMNS}"
)
_CLAIM = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, "
    f"owner = ?, lease_until = ? WHERE id = ? AND state = 'queued' RETURNING {JOB_COLUMNS}"
)
_HEARTBEAT = "UPDATE jobs SET lease_until = ? WHERE state = 'running' AND owner = ?"
_FINISH = (
    "UPDATE jobs SET state = ?, finished_at = ?, result = ?, error = ?, owner = NULL, "
    "lease_until = NULL WHERE id = ? AND state = 'running' AND owner = ?"
)
_CANCEL = (
    "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ?, owner = NULL, "
    f"lease_until = NULL WHERE id = ? RETURNING {JOB_COLUMNS}"
)
_REQUEUE = "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL WHERE "
_RELEASE = _REQUEUE + "owner = ? AND id = ? AND state = 'running'"
_RECOVER = _REQUEUE + "state = 'running' AND (lease_until < ? OR (? AND owner IS NOT ?))"
_QUEUED = f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid"
_COUNTS = "SELECT state, COUNT(*) FROM jobs GROUP BY state"
_ADD_KEY = f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_REMOVE_KEY = "DELETE FROM api_keys WHERE user = ?"
_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY user"


def _job(row: Sequence[Any]) -> Job:
    """Build a ``Job`` from a row of ``JOB_COLUMNS``, whose JSON columns are text."""
    return job_from_row(row, json.loads)


def _select(conn: sqlite3.Connection, job_id: str) -> Job | None:
    row = conn.execute(_GET, (job_id,)).fetchone()
    return None if row is None else _job(row)


def _stop(conn: sqlite3.Connection) -> None:
    """Never called: as an op, ends its thread after everything queued before it."""


def _settle(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Resolve callers' futures; runs on their loop. A cancelled caller is skipped."""
    for future, ok, value in items:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def _deliver(ops: Sequence[_Op], outcomes: Sequence[tuple[bool, Any]]) -> None:
    """Hand each outcome to its caller's loop: one wake-up per loop, not per op."""
    by_loop: dict[_Loop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for (_, future, loop), (ok, value) in zip(ops, outcomes, strict=True):
        by_loop.setdefault(loop, []).append((future, ok, value))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:
            pass  # that loop is closed: nobody is waiting any more


class SQLiteStore:
    """A ``Store`` in one SQLite file, durable on return, with group commit.

    Each method keeps the contract written on the ``Store`` protocol (``store/_types.py``).

    Args:
        path: The database file; created by ``open`` if missing (its folder must exist).
        batch: The most operations committed in one transaction.
        exclusive: Lock the file against other servers (``<path>.lock``). ``False`` is
            for tools that only add or remove keys beside a running server.
    """

    #: One server keeps the queue in its memory; the file only records it.
    shared = False

    def __init__(
        self, path: str | os.PathLike[str], *, batch: int = 512, exclusive: bool = True
    ) -> None:
        at_least_one("batch", batch)
        self.path = os.fspath(path)
        self.batch = batch
        # True: the file lock keeps every other server out (``Store.exclusive``).
        self.exclusive = exclusive
        self._state = Lifecycle.NEW
        self._commits = 0
        self._writes: _Queue = queue.SimpleQueue()
        self._reads: _Queue = queue.SimpleQueue()
        self._threads: list[tuple[threading.Thread, _Queue]] = []
        self._exited: set[threading.Thread] = set()  # guarded by _exit_lock
        self._exit_lock = threading.Lock()
        self._lock_fd: int | None = None

    @property
    def commits(self) -> int:
        """How many write transactions this store has committed (read-only)."""
        return self._commits

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the file, create or migrate the schema, start the writer and reader.

        Raises:
            StoreError: The folder is missing, the file is not an escala SQLite store, its
                schema is newer than this escala, another server holds it, or it was
                opened already.
        """
        if self._state is not Lifecycle.NEW:
            raise already_opened(f"store {self.path}")
        self._state = Lifecycle.OPEN
        try:
            await self._start("writer", self._writer_connect, self._writes, self._write_loop)
            await self._start("reader", self._reader_connect, self._reads, self._read_loop)
        except BaseException:
            await self.close()
            raise

    async def _start(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        ops: _Queue,
        run: Callable[[sqlite3.Connection, _Queue], _Op],
    ) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def main() -> None:
            stop = None
            try:
                conn = connect()
            except BaseException as exc:
                _deliver([(_stop, ready, loop)], [(False, exc)])
            else:
                _deliver([(_stop, ready, loop)], [(True, None)])
                try:
                    stop = run(conn, ops)
                finally:
                    conn.close()
            finally:
                self._exit(ops, stop)

        thread = threading.Thread(target=main, name=f"escala-sqlite-{name}", daemon=True)
        thread.start()
        self._threads.append((thread, ops))  # from now on, close() stops it
        await ready

    def _exit(self, ops: _Queue, stop: _Op | None) -> None:
        """Last act of a thread: answer whatever is left in its queue, ``close`` included."""
        with self._exit_lock:
            self._exited.add(threading.current_thread())
            left = [] if stop is None else [stop]
            while True:
                try:
                    left.append(ops.get_nowait())
                except queue.Empty:
                    break
        # one error per caller: an exception raised in several tasks would share a traceback
        outcomes = [
            (True, None) if op[0] is _stop else (False, not_open(Lifecycle.CLOSED)) for op in left
        ]
        _deliver(left, outcomes)

    async def close(self) -> None:
        """Commit every write queued so far, stop both threads, release the file lock.

        Safe to call twice, and after a failed or cancelled ``open``.
        """
        if self._state is Lifecycle.CLOSED:
            return
        self._state = Lifecycle.CLOSED
        loop = asyncio.get_running_loop()
        try:
            # The reader first: the writer's connection, closed last, then checkpoints
            # the log into the database file and removes it.
            for thread, ops in reversed(self._threads):
                stopped: asyncio.Future[None] = loop.create_future()
                with self._exit_lock:
                    if thread in self._exited:  # nothing would read the stop op
                        continue
                    ops.put((_stop, stopped, loop))  # after every op queued so far
                await stopped
        finally:
            for thread, _ in self._threads:
                thread.join()  # it has closed its connection: only returning is left
            self._threads.clear()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 10000")
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc
        return conn

    def _open_error(self, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.OperationalError
        ):  # "file is not a database", "database disk image is malformed"
            return StoreError(
                f"{self.path} is not a usable escala job store ({exc}); move it away or "
                "choose another path"
            )
        return StoreError(f"cannot open the job store {self.path}: {exc}")

    def _writer_connect(self) -> sqlite3.Connection:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise StoreError(
                f"cannot create the job store {self.path}: the folder {folder} does not "
                "exist; create it or choose another path"
            )
        if self.exclusive:
            self._lock()
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")  # all migrations or none
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise newer_schema(f"the job store {self.path}", version, SCHEMA_VERSION)
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.close()  # rolls back what the migrations began
            if isinstance(exc, sqlite3.Error):
                raise self._open_error(exc) from exc
            raise
        return conn

    def _reader_connect(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only = 1")
        return conn

    def _lock(self) -> None:
        """Take the single-server lock on ``<path>.lock`` and write our pid in it."""
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"the job store {self.path} is in use by another escala server "
                f"(pid {holder}); stop it, or give this one another store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    # -- the two threads ---------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection, ops: _Queue) -> _Op:
        """Commit what is queued in groups of up to ``batch``; return the stop op."""
        while True:
            group: list[_Op] = []
            item = ops.get()
            while item[0] is not _stop:
                group.append(item)
                if len(group) >= self.batch:
                    break
                try:
                    item = ops.get_nowait()
                except queue.Empty:
                    break
            if group:
                _deliver(group, self._commit(conn, group))
            if item[0] is _stop:
                return item

    def _commit(self, conn: sqlite3.Connection, group: list[_Op]) -> list[tuple[bool, Any]]:
        """Run a group of writes in one transaction, each op in its own savepoint."""
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for fn, _, _ in group:
                    conn.execute("SAVEPOINT op")
                    try:
                        outcomes.append((True, fn(conn)))
                    except Exception as exc:
                        conn.execute("ROLLBACK TO op")
                        outcomes.append((False, self._error(exc)))
                    conn.execute("RELEASE op")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
        except Exception as exc:  # the whole group is lost: every caller hears why
            return [(False, self._error(exc)) for _ in group]
        self._commits += 1
        return outcomes

    def _read_loop(self, conn: sqlite3.Connection, ops: _Queue) -> _Op:
        """Run reads one at a time, each its own snapshot; return the stop op."""
        while (item := ops.get())[0] is not _stop:
            try:
                outcome: tuple[bool, Any] = (True, item[0](conn))
            except Exception as exc:
                outcome = (False, self._error(exc))
            _deliver([item], [outcome])
        return item

    def _error(self, exc: Exception) -> Exception:
        """Translate SQLite's errors at the boundary; an op's own errors pass unchanged."""
        if isinstance(exc, sqlite3.Error):
            return database_error(f"job store {self.path}", exc)
        return exc

    async def _call(self, ops: _Queue, fn: Callable[..., T]) -> T:
        if self._state is not Lifecycle.OPEN:
            raise not_open(self._state)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        ops.put((fn, future, loop))
        return await future

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the writer thread, in the next group commit."""
        return await self._call(self._writes, fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the reader thread."""
        return await self._call(self._reads, fn)

    # -- jobs --------------------------------------------------------------------------

    async def submit(self, job: NewJob) -> tuple[Job, bool]:
        """Commit a new QUEUED job, or find the one its idempotency key created."""
        args, kwargs = encode_job(job)
        key, now = job.idempotency_key, time.time()

        def op(conn: sqlite3.Connection) -> tuple[Job, bool]:
            if key is not None:  # one writer: this look-up and the insert cannot race
                found = conn.execute(_SELECT_KEY, (job.user, key)).fetchone()
                if found is not None:
                    return _job(found), False
            values = (uuid.uuid4().hex, job.user, job.task, args, kwargs, job.priority)
            return _job(conn.execute(_INSERT, (*values, key, now)).fetchone()), True

        return await self._write(op)

    async def get(self, job_id: str) -> Job | None:
        """Return the job with that id, or ``None`` when there is none."""
        return await self._read(lambda conn: _select(conn, job_id))

    async def find(self, user: str, idempotency_key: str) -> Job | None:
        """Return the user's job made with that idempotency key, or ``None``."""

        def select(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(_SELECT_KEY, (user, idempotency_key)).fetchone()
            return None if row is None else _job(row)

        return await self._read(select)

    async def claim(self, job_ids: Sequence[str], owner: str, lease: float) -> list[Job]:
        """Move those of ``job_ids`` still QUEUED to RUNNING for ``owner``, in one write."""
        now, ids = time.time(), list(dict.fromkeys(job_ids))
        if not ids:
            return []

        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = (conn.execute(_CLAIM, (now, owner, now + lease, i)).fetchone() for i in ids)
            return [_job(row) for row in rows if row is not None]

        return await self._write(op)

    async def heartbeat(self, owner: str, lease: float) -> int:
        """Extend to ``now + lease`` the lease of every RUNNING job of ``owner``."""
        params = (time.time() + lease, owner)
        return await self._write(lambda conn: conn.execute(_HEARTBEAT, params).rowcount)

    async def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        result: Any = None,
        error: Mapping[str, str] | None = None,
    ) -> bool:
        """Record the end of a RUNNING job held by ``owner``."""
        # Checked here, not in the writer: a bad result must not reach a group.
        out, err = encode_outcome(job_id, state, result, error)
        params = (state.value, time.time(), out, err, job_id, owner)
        return await self._write(lambda conn: conn.execute(_FINISH, params).rowcount == 1)

    async def cancel(self, job_id: str, user: str) -> Job | None:
        """Cancel the user's job if it is QUEUED or RUNNING."""
        now = time.time()

        def op(conn: sqlite3.Connection) -> Job | None:
            job = _select(conn, job_id)
            if job is None or job.user != user:
                return None
            if job.state.final:
                return job
            return _job(conn.execute(_CANCEL, (now, CANCELLED, job_id)).fetchone())

        return await self._write(op)

    async def release(self, owner: str, job_ids: Sequence[str]) -> int:
        """Put RUNNING jobs of ``owner`` back to QUEUED, keeping their ``attempts``."""
        params = [(owner, job_id) for job_id in job_ids]
        if not params:
            return 0
        return await self._write(lambda conn: conn.executemany(_RELEASE, params).rowcount)

    async def recover(self, owner: str, *, all_others: bool = False) -> int:
        """Put back to QUEUED every RUNNING job whose lease has expired."""
        params = (time.time(), all_others, owner)
        return await self._write(lambda conn: conn.execute(_RECOVER, params).rowcount)

    async def queued(self) -> list[Job]:
        """Return every QUEUED job, oldest first."""
        return await self._read(lambda conn: [_job(row) for row in conn.execute(_QUEUED)])

    async def counts(self) -> dict[JobState, int]:
        """Return how many jobs are in each state; every state is a key."""
        return count_states(await self._read(lambda conn: conn.execute(_COUNTS).fetchall()))

    # -- keys --------------------------------------------------------------------------

    async def add_key(self, key: ApiKey) -> None:
        """Store a key record."""
        values = key_row(key)

        def op(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(_ADD_KEY, values)
            except sqlite3.IntegrityError:
                raise key_taken(key.user) from None

        await self._write(op)

    async def remove_key(self, user: str) -> bool:
        """Delete the user's key record; ``False`` when there was none."""
        return await self._write(lambda conn: conn.execute(_REMOVE_KEY, (user,)).rowcount > 0)

    async def keys(self) -> list[ApiKey]:
        """Return every key record, by user."""
        return await self._read(lambda conn: [ApiKey(*row) for row in conn.execute(_KEYS)])
