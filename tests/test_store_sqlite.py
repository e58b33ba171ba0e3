"""What only the SQLite job store does: durability through a crash, group commit, the lock.

The Store contract itself, which SQLite keeps like every store, is in ``test_store.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from escala.store import ApiKey, JobState, NewJob, StoreError
from escala.store.sqlite import SCHEMA_VERSION, SQLiteStore

T = TypeVar("T")


@contextlib.asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(path, **options)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def run(path: Path, body: Callable[[SQLiteStore], Awaitable[T]], **options: Any) -> T:
    """Open a store on ``path``, run ``body(store)`` on a fresh loop, always close it."""

    async def main() -> T:
        async with opened(path, **options) as store:
            return await body(store)

    return asyncio.run(main())


def job(user: str = "ann", key: str | None = None, **fields: Any) -> NewJob:
    return NewJob(user=user, task="add", idempotency_key=key, **fields)


_CRASH = textwrap.dedent(
    """
    import asyncio, os, sys
    from escala.store import NewJob
    from escala.store.sqlite import SQLiteStore

    async def main():
        store = SQLiteStore(sys.argv[1])
        await store.open()
        n = int(sys.argv[2])
        await asyncio.gather(*(store.submit(NewJob("ann", "t", [i])) for i in range(n)))
        print("ok", flush=True)
        os._exit(0)  # a crash: no close, no checkpoint, the lock held until exit

    asyncio.run(main())
    """
)


def test_submitted_jobs_survive_a_crash(tmp_path: Path) -> None:
    path, n = tmp_path / "jobs.db", 300
    child = subprocess.run(
        [sys.executable, "-c", _CRASH, str(path), str(n)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0 and child.stdout == "ok\n", child.stderr

    async def body(store: SQLiteStore) -> None:  # the dead child's lock is gone too
        queued = await store.queued()
        assert sorted(j.args[0] for j in queued) == list(range(n))

    run(path, body)


def test_concurrent_submits_share_commits(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        before = store.commits
        results = await asyncio.gather(*(store.submit(job(args=[i])) for i in range(1000)))
        assert all(created for _, created in results)
        assert store.commits - before <= 50, store.commits - before  # not one per job
        assert (await store.counts())[JobState.QUEUED] == 1000
        # one writer: the queue keeps the order in which the calls were made
        assert [j.id for j in await store.queued()] == [j.id for j, _ in results]

    run(tmp_path / "jobs.db", body)


def test_a_failing_op_fails_only_its_caller(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        loop, gate = asyncio.get_running_loop(), threading.Event()
        entered: asyncio.Future[None] = loop.create_future()

        def block(conn: sqlite3.Connection) -> None:  # holds the writer in a first group
            loop.call_soon_threadsafe(entered.set_result, None)
            gate.wait(10)

        def half_then_raise(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO api_keys VALUES ('eve', 'h', 1, NULL, NULL, 0)")
            raise RuntimeError("boom")

        def bad_sql(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO no_such_table VALUES (1)")

        blocker = asyncio.ensure_future(store._write(block))
        await entered
        before = store.commits
        tasks = [
            asyncio.ensure_future(store.submit(job(args=[1]))),
            asyncio.ensure_future(store._write(half_then_raise)),
            asyncio.ensure_future(store._write(bad_sql)),
            asyncio.ensure_future(store.submit(job(args=[2]))),
        ]
        await asyncio.sleep(0)  # every task has queued its op behind the blocker
        gate.set()
        first, boom, sql, second = await asyncio.gather(*tasks, return_exceptions=True)
        await blocker
        assert store.commits - before == 2  # the blocker's group, then the four together
        assert isinstance(boom, RuntimeError) and str(boom) == "boom"
        assert isinstance(sql, StoreError) and "no_such_table" in str(sql)
        assert isinstance(sql.__cause__, sqlite3.OperationalError)
        for result in (first, second):
            assert isinstance(result, tuple) and await store.get(result[0].id) is not None
        assert await store.keys() == []  # the failed op's own write was rolled back

    run(tmp_path / "jobs.db", body)


def test_a_closed_callers_loop_does_not_stop_the_writer(tmp_path: Path) -> None:
    store, gate = SQLiteStore(tmp_path / "jobs.db"), threading.Event()

    async def first() -> None:
        await store.open()
        loop = asyncio.get_running_loop()
        entered: asyncio.Future[None] = loop.create_future()

        def block(conn: sqlite3.Connection) -> None:
            loop.call_soon_threadsafe(entered.set_result, None)
            gate.wait(10)

        pending: list[asyncio.Future[Any]] = [asyncio.ensure_future(store._write(block))]
        await entered
        pending.append(asyncio.ensure_future(store.submit(job(key="orphan"))))
        await asyncio.sleep(0)  # queued; then asyncio.run cancels both and closes the loop
        assert not any(task.done() for task in pending)

    async def second() -> None:
        try:
            gate.set()  # the writer now answers a closed loop
            orphan, created = await store.submit(job(key="orphan"))
            assert not created and orphan.state is JobState.QUEUED
        finally:
            await store.close()

    try:
        asyncio.run(first())
    finally:
        gate.set()
        asyncio.run(second())


def test_close_commits_what_was_queued(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"

    async def main() -> None:
        store = SQLiteStore(path)
        await store.open()
        tasks = [asyncio.ensure_future(store.submit(job(args=[i]))) for i in range(20)]
        await asyncio.sleep(0)  # all queued, none answered yet
        await store.close()
        assert all(t.result()[1] for t in tasks)

    asyncio.run(main())
    assert len(run(path, lambda store: store.queued())) == 20


def test_one_exclusive_server_per_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"

    async def main() -> None:
        async with opened(path) as server:
            second = SQLiteStore(path)
            held = rf"in use by another escala server \(pid {os.getpid()}\)"
            with pytest.raises(StoreError, match=held):
                await second.open()
            await second.close()
            async with opened(path, exclusive=False) as cli:  # `escala keys` beside it
                await cli.add_key(ApiKey("ann", "a" * 64))
            assert [k.user for k in await server.keys()] == ["ann"]
        async with opened(path) as again:  # released on close
            assert len(await again.keys()) == 1

    asyncio.run(main())


def test_not_a_database_and_missing_folder(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"these are not the pages you are looking for\n" * 100)
    missing = tmp_path / "no" / "such" / "jobs.db"

    async def main() -> None:
        for path, message in [(junk, "not a usable escala job store"), (missing, "create it")]:
            store = SQLiteStore(path)
            with pytest.raises(StoreError, match=message) as caught:
                await store.open()
            assert str(path) in str(caught.value)
            await store.close()

    asyncio.run(main())
    assert not missing.parent.exists()


def test_schema_is_versioned_and_newer_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    run(path, lambda store: store.counts())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()

    async def main() -> None:
        store = SQLiteStore(path)
        with pytest.raises(StoreError, match="newer than this escala knows"):
            await store.open()
        await store.close()

    asyncio.run(main())


def test_a_cancelled_open_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"

    async def main() -> None:
        store = SQLiteStore(path)
        opening = asyncio.ensure_future(store.open())
        await asyncio.sleep(0)  # the writer thread is starting
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        with pytest.raises(StoreError, match="store is closed"):
            await store.get("x")
        async with opened(path) as again:  # the lock was released
            assert await again.queued() == []

    asyncio.run(main())


def test_nul_characters_are_kept(tmp_path: Path) -> None:
    """SQLite keeps any JSON string; PostgreSQL's JSONB refuses NUL (test_store_postgres)."""

    async def body(store: SQLiteStore) -> None:
        made, _ = await store.submit(job(args=["a\x00b"], kwargs={"k": "\x00"}))
        await store.claim([made.id], "w1", 30)
        assert await store.finish(made.id, "w1", JobState.SUCCEEDED, result="c\x00")
        done = await store.get(made.id)
        assert done is not None and (done.args, done.kwargs) == (["a\x00b"], {"k": "\x00"})
        assert done.result == "c\x00"

    run(tmp_path / "jobs.db", body)
