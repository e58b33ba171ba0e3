"""The SQLite job store: the Store contract, durability, group commit and the file lock."""

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


def test_submit_and_get_round_trip(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        sent = job(args=(1, 2.5, "x"), kwargs={"deep": [None, {"a": True}]}, priority=3)
        made, created = await store.submit(sent)
        assert created
        assert len(made.id) == 32 and made.state is JobState.QUEUED
        assert (made.user, made.task, made.priority) == ("ann", "add", 3)
        assert made.args == [1, 2.5, "x"] and made.kwargs == {"deep": [None, {"a": True}]}
        assert made.attempts == 0 and made.started_at is None and made.owner is None
        assert await store.get(made.id) == made
        assert await store.get("no-such-job") is None

    run(tmp_path / "jobs.db", body)


def test_jobs_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"

    async def write(store: SQLiteStore) -> list[str]:
        done, _ = await store.submit(job())
        await store.claim([done.id], "w1", 60)
        assert await store.finish(done.id, "w1", JobState.SUCCEEDED, result={"sum": 3})
        waiting, _ = await store.submit(job(key="k"))
        return [done.id, waiting.id]

    ids = run(path, write)

    async def read(store: SQLiteStore) -> None:
        done, waiting = await store.get(ids[0]), await store.get(ids[1])
        assert done is not None and done.state is JobState.SUCCEEDED
        assert done.result == {"sum": 3} and done.owner is None
        assert waiting is not None and waiting.state is JobState.QUEUED
        again, created = await store.submit(job(key="k"))
        assert again == waiting and not created  # the key survives too

    run(path, read)


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


def test_idempotency_key_is_per_user(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        first, created = await store.submit(job(key="k1", args=[1]))
        assert created
        again, created = await store.submit(job(key="k1", args=[2]))  # whatever was sent
        assert not created and again == first
        await store.cancel(first.id, "ann")
        again, created = await store.submit(job(key="k1"))  # whatever its state
        assert not created and again.id == first.id and again.state is JobState.CANCELLED
        other, created = await store.submit(job(user="bob", key="k1"))
        assert created and other.id != first.id
        assert (await store.find("ann", "k1")) == again
        assert (await store.find("bob", "k1")) == other
        assert await store.find("ann", "k2") is None
        plain = [await store.submit(job()) for _ in range(2)]
        assert all(created for _, created in plain) and plain[0][0].id != plain[1][0].id

    run(tmp_path / "jobs.db", body)


def test_concurrent_idempotent_submits_make_one_job(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        results = await asyncio.gather(*(store.submit(job(key="same")) for _ in range(50)))
        assert len({j.id for j, _ in results}) == 1
        assert sum(created for _, created in results) == 1

    run(tmp_path / "jobs.db", body)


def test_concurrent_submits_share_commits(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        before = store.commits
        results = await asyncio.gather(*(store.submit(job(args=[i])) for i in range(1000)))
        assert all(created for _, created in results)
        assert store.commits - before <= 50, store.commits - before  # not one per job
        assert (await store.counts())[JobState.QUEUED] == 1000

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


def test_claim_skips_jobs_not_queued_and_counts_attempts(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        a, b, c = [(await store.submit(job(args=[i])))[0] for i in range(3)]
        await store.cancel(b.id, "ann")
        claimed = await store.claim([c.id, b.id, "missing", a.id], "w1", 30)
        assert [j.id for j in claimed] == [c.id, a.id]
        for got in claimed:
            assert got.state is JobState.RUNNING and got.owner == "w1" and got.attempts == 1
            assert got.started_at is not None and got.lease_until == got.started_at + 30
            assert await store.get(got.id) == got
        assert await store.claim([a.id], "w2", 30) == []  # already running
        assert await store.release("w1", [a.id]) == 1
        (again,) = await store.claim([a.id], "w2", 30)
        assert again.attempts == 2 and again.owner == "w2"

    run(tmp_path / "jobs.db", body)


def test_finish_only_by_the_owner_of_a_running_job(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        a, b = [(await store.submit(job()))[0] for _ in range(2)]
        assert not await store.finish(a.id, "w1", JobState.SUCCEEDED)  # still queued
        await store.claim([a.id, b.id], "w1", 30)
        assert not await store.finish(a.id, "w2", JobState.SUCCEEDED, result=1)
        assert await store.finish(a.id, "w1", JobState.SUCCEEDED, result=[1, "two"])
        assert not await store.finish(a.id, "w1", JobState.FAILED)  # already final
        done = await store.get(a.id)
        assert done is not None and done.state is JobState.SUCCEEDED
        assert done.result == [1, "two"] and done.error is None and done.finished_at
        assert done.owner is None and done.lease_until is None
        error = {"type": "ValueError", "message": "bad input"}
        assert await store.finish(b.id, "w1", JobState.FAILED, error=error)
        failed = await store.get(b.id)
        assert failed is not None and failed.state is JobState.FAILED and failed.error == error
        with pytest.raises(ValueError, match="succeeded or failed"):
            await store.finish(b.id, "w1", JobState.CANCELLED)

    run(tmp_path / "jobs.db", body)


def test_finish_with_a_non_json_result_writes_nothing(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        made, _ = await store.submit(job())
        await store.claim([made.id], "w1", 30)
        with pytest.raises(TypeError, match=r"result of job .* not a JSON value \(set"):
            await store.finish(made.id, "w1", JobState.SUCCEEDED, result={1, 2})
        with pytest.raises(TypeError, match="not a JSON value"):
            await store.finish(made.id, "w1", JobState.SUCCEEDED, result=[float("nan")])
        still = await store.get(made.id)
        assert still is not None and still.state is JobState.RUNNING and still.owner == "w1"
        assert await store.finish(made.id, "w1", JobState.FAILED, error={"type": "TypeError"})
        with pytest.raises(TypeError, match="args"):
            await store.submit(job(args=[object()]))
        assert sum((await store.counts()).values()) == 1

    run(tmp_path / "jobs.db", body)


def test_cancel(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        queued, running = [(await store.submit(job()))[0] for _ in range(2)]
        await store.claim([running.id], "w1", 30)
        assert await store.cancel(queued.id, "bob") is None  # another user's
        assert await store.cancel("missing", "ann") is None
        for original in (queued, running):
            cancelled = await store.cancel(original.id, "ann")
            assert cancelled is not None and cancelled.state is JobState.CANCELLED
            assert cancelled.error == {"type": "Cancelled", "message": "cancelled by the user"}
            assert cancelled.finished_at is not None and cancelled.owner is None
            assert await store.cancel(original.id, "ann") == cancelled  # final: unchanged
        assert not await store.finish(running.id, "w1", JobState.SUCCEEDED, result=1)
        assert await store.claim([queued.id], "w1", 30) == []

    run(tmp_path / "jobs.db", body)


def test_release_heartbeat_and_recover(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        a, b, c, d = [(await store.submit(job()))[0] for _ in range(4)]
        await store.claim([a.id, b.id], "me", 60)
        assert await store.release("me", [a.id, c.id, "missing"]) == 1
        released = await store.get(a.id)
        assert released is not None and released.state is JobState.QUEUED
        assert released.owner is None and released.lease_until is None
        assert released.attempts == 1
        assert await store.release("other", [b.id]) == 0 and await store.release("me", []) == 0

        await store.claim([c.id], "dead", -1)  # its lease expired at once
        await store.claim([d.id], "alive", 60)
        assert await store.recover("me") == 1  # only the expired lease
        assert [j.id for j in await store.queued()] == [a.id, c.id]
        assert await store.recover("me", all_others=True) == 1  # "alive", not "me"
        assert {j.id for j in await store.queued()} == {a.id, c.id, d.id}

        assert await store.heartbeat("me", -1) == 1  # b: now expired too
        assert await store.heartbeat("nobody", 60) == 0
        assert await store.recover("me") == 1
        assert (await store.counts())[JobState.RUNNING] == 0

    run(tmp_path / "jobs.db", body)


def test_queued_oldest_first_and_counts(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        made = await asyncio.gather(*(store.submit(job(args=[i])) for i in range(30)))
        ids = [j.id for j, _ in made]
        await store.claim([ids[3]], "w1", 30)
        await store.cancel(ids[5], "ann")
        await store.claim([ids[7]], "w1", 30)
        await store.finish(ids[7], "w1", JobState.FAILED, error={"type": "E", "message": ""})
        assert [j.id for j in await store.queued()] == [
            i for n, i in enumerate(ids) if n not in (3, 5, 7)
        ]
        assert await store.counts() == {
            JobState.QUEUED: 27,
            JobState.RUNNING: 1,
            JobState.SUCCEEDED: 0,
            JobState.FAILED: 1,
            JobState.CANCELLED: 1,
        }

    run(tmp_path / "jobs.db", body)


def test_keys(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        ann = ApiKey("ann", "a" * 64, weight=2.0, rate=5.0, burst=10, created_at=1.5)
        bob = ApiKey("bob", "b" * 64)
        await store.add_key(bob)
        await store.add_key(ann)
        with pytest.raises(StoreError, match="'ann' already has a key; remove it first"):
            await store.add_key(ApiKey("ann", "c" * 64))
        assert await store.keys() == [ann, bob]
        assert await store.remove_key("ann") and not await store.remove_key("ann")
        await store.add_key(ApiKey("ann", "c" * 64))
        assert [k.key_hash[0] for k in await store.keys()] == ["c", "b"]

    run(tmp_path / "jobs.db", body)


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


def test_methods_need_an_open_store(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "jobs.db")
        with pytest.raises(StoreError, match="not open"):
            await store.get("x")
        await store.open()
        with pytest.raises(StoreError, match="already opened"):
            await store.open()
        await store.close()
        await store.close()  # twice is fine
        for call in (store.submit(job()), store.get("x"), store.keys(), store.recover("me")):
            with pytest.raises(StoreError, match="store is closed"):
                await call

    asyncio.run(main())
