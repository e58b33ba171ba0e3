"""The Store contract, once, run against every store: SQLite and PostgreSQL.

Each test gets ``store``: a new, unopened store on a database of its own (a SQLite file in
``tmp_path``, or a fresh database on the session's PostgreSQL server, ``pg_url`` in
``conftest.py``). What only one store does is tested beside it: ``test_store_sqlite.py``
(a crash, group commit, the file lock, its schema), ``test_store_postgres.py`` (nodes
claiming at once, migrations, connection errors) and ``test_store_shared.py`` (the
duties of a ``SharedStore``).
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from escala.store import ApiKey, JobState, NewJob, Store, StoreError, is_shared, open_store
from escala.store.postgres import PostgresStore
from escala.store.sqlite import SQLiteStore

T = TypeVar("T")

#: What each kind of store says of itself: (shared, exclusive).
FLAGS: dict[type[Any], tuple[bool, bool]] = {
    SQLiteStore: (False, True),  # one server per file, which keeps the queue in memory
    PostgresStore: (True, False),  # many nodes, and the queue lives in the database
}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Store:
    """A new, unopened store of each kind, on a database of its own."""
    if request.param == "postgres":
        return PostgresStore(request.getfixturevalue("pg_url"))
    return SQLiteStore(tmp_path / "jobs.db")


def twin(store: Store, **options: Any) -> Store:
    """Return another, unopened store object on the same database as ``store``."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path, **options)
    assert isinstance(store, PostgresStore)
    return PostgresStore(store.url, **options)


def beside(store: Store) -> Store:
    """Return a second store that may be open beside ``store`` (SQLite: without the lock)."""
    return twin(store, exclusive=False) if isinstance(store, SQLiteStore) else twin(store)


@contextlib.asynccontextmanager
async def opened(store: Store) -> AsyncIterator[Store]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def run(store: Store, body: Callable[[Store], Awaitable[T]]) -> T:
    """Open ``store``, run ``body(store)`` on a fresh loop, always close it."""

    async def main() -> T:
        async with opened(store):
            return await body(store)

    return asyncio.run(main())


def job(user: str = "ann", key: str | None = None, **fields: Any) -> NewJob:
    return NewJob(user=user, task="add", idempotency_key=key, **fields)


def test_flags_say_who_else_uses_the_store(store: Store) -> None:
    assert (store.shared, store.exclusive) == FLAGS[type(store)]
    assert is_shared(store) is store.shared
    assert beside(store).exclusive is False  # no second server may assume the others dead


def test_submit_and_get_round_trip(store: Store) -> None:
    async def body(store: Store) -> None:
        sent = job(args=(1, 2.5, "x"), kwargs={"deep": [None, {"a": True}]}, priority=3)
        made, created = await store.submit(sent)
        assert created
        assert len(made.id) == 32 and made.state is JobState.QUEUED
        assert (made.user, made.task, made.priority) == ("ann", "add", 3)
        assert made.args == [1, 2.5, "x"] and made.kwargs == {"deep": [None, {"a": True}]}
        assert made.attempts == 0 and made.started_at is None and made.owner is None
        assert isinstance(made.created_at, float)
        assert await store.get(made.id) == made
        assert await store.get("no-such-job") is None

    run(store, body)


def test_jobs_survive_close_and_reopen(store: Store) -> None:
    async def write(store: Store) -> list[str]:
        done, _ = await store.submit(job())
        await store.claim([done.id], "w1", 60)
        assert await store.finish(done.id, "w1", JobState.SUCCEEDED, result={"sum": 3})
        waiting, _ = await store.submit(job(key="k"))
        return [done.id, waiting.id]

    ids = run(store, write)

    async def read(store: Store) -> None:
        done, waiting = await store.get(ids[0]), await store.get(ids[1])
        assert done is not None and done.state is JobState.SUCCEEDED
        assert done.result == {"sum": 3} and done.owner is None
        assert waiting is not None and waiting.state is JobState.QUEUED
        again, created = await store.submit(job(key="k"))
        assert again == waiting and not created  # the key survives too

    run(twin(store), read)  # a new store object: nothing is kept in the old one's memory


def test_idempotency_key_is_per_user(store: Store) -> None:
    async def body(store: Store) -> None:
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

    run(store, body)


def test_concurrent_idempotent_submits_make_one_job(store: Store) -> None:
    async def main() -> None:
        # two store objects on one database (two nodes, or a server and a tool), 50 calls
        async with opened(store) as one, opened(beside(store)) as two:
            results = await asyncio.gather(*(s.submit(job(key="same")) for s in [one, two] * 25))
            assert len({j.id for j, _ in results}) == 1
            assert sum(created for _, created in results) == 1
            assert (await one.counts())[JobState.QUEUED] == 1

    asyncio.run(main())


def test_claim_skips_jobs_not_queued_and_counts_attempts(store: Store) -> None:
    async def body(store: Store) -> None:
        a, b, c = [(await store.submit(job(args=[i])))[0] for i in range(3)]
        await store.cancel(b.id, "ann")
        claimed = await store.claim([c.id, b.id, "missing", a.id, c.id], "w1", 30)
        assert [j.id for j in claimed] == [c.id, a.id]  # c once, though asked twice
        for got in claimed:
            assert got.state is JobState.RUNNING and got.owner == "w1" and got.attempts == 1
            assert got.started_at is not None and got.lease_until == got.started_at + 30
            assert await store.get(got.id) == got
        assert await store.claim([a.id], "w2", 30) == []  # already running
        assert await store.claim([], "w2", 30) == []
        assert await store.release("w1", [a.id]) == 1
        (again,) = await store.claim([a.id], "w2", 30)
        assert again.attempts == 2 and again.owner == "w2"

    run(store, body)


def test_finish_only_by_the_owner_of_a_running_job(store: Store) -> None:
    async def body(store: Store) -> None:
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

    run(store, body)


def test_non_json_values_write_nothing(store: Store) -> None:
    async def body(store: Store) -> None:
        made, _ = await store.submit(job())
        await store.claim([made.id], "w1", 30)
        with pytest.raises(TypeError, match=r"result of job .* not a JSON value \(set"):
            await store.finish(made.id, "w1", JobState.SUCCEEDED, result={1, 2})
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(TypeError, match="not a JSON value"):
                await store.finish(made.id, "w1", JobState.SUCCEEDED, result=[bad])
        still = await store.get(made.id)
        assert still is not None and still.state is JobState.RUNNING and still.owner == "w1"
        assert await store.finish(made.id, "w1", JobState.FAILED, error={"type": "TypeError"})
        with pytest.raises(TypeError, match="args"):
            await store.submit(job(args=[object()]))
        with pytest.raises(TypeError, match="kwargs"):
            await store.submit(job(kwargs={"x": float("nan")}))
        assert sum((await store.counts()).values()) == 1

    run(store, body)


def test_cancel(store: Store) -> None:
    async def body(store: Store) -> None:
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

    run(store, body)


def test_release_heartbeat_and_recover(store: Store) -> None:
    async def body(store: Store) -> None:
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

    run(store, body)


def test_queued_oldest_first_and_counts(store: Store) -> None:
    async def body(store: Store) -> None:
        # one after another: jobs submitted at once have no order between them
        ids = [(await store.submit(job(args=[i])))[0].id for i in range(30)]
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

    run(store, body)


def test_keys(store: Store) -> None:
    async def body(store: Store) -> None:
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

    run(store, body)


def test_methods_need_an_open_store(store: Store) -> None:
    async def main() -> None:
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
        with pytest.raises(StoreError, match="already opened"):
            await store.open()  # a store is opened once: a new object opens it again

    asyncio.run(main())


# -- the registry --------------------------------------------------------------------------


def test_open_store_picks_by_url(tmp_path: pathlib.Path) -> None:
    pg_store = open_store("postgresql://nobody@127.0.0.1:1/none")
    assert isinstance(pg_store, PostgresStore) and is_shared(pg_store)
    lite = open_store(f"{tmp_path}/jobs.db")
    assert isinstance(lite, SQLiteStore) and not is_shared(lite) and lite.exclusive
    assert open_store(tmp_path / "jobs.db", exclusive=False).exclusive is False


def test_open_store_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails
    monkeypatch.delitem(sys.modules, "escala.store.postgres", raising=False)
    with pytest.raises(StoreError, match=r"pip install 'escala\[postgres\]'"):
        open_store("postgres://nobody@127.0.0.1:1/none")
    assert isinstance(open_store("jobs.db"), SQLiteStore)  # SQLite needs nothing more
