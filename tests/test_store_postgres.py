"""The PostgreSQL job store: the Store contract, multi-node claiming and migrations.

Each test gets a database of its own (``pg_url``) on one server for the session
(``pg_server``, both in ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from escala.store import ApiKey, JobState, NewJob, StoreError
from escala.store.postgres import SCHEMA_VERSION, PostgresStore

T = TypeVar("T")


@pytest.fixture
def url(pg_url: str) -> str:
    return pg_url


@contextlib.asynccontextmanager
async def opened(url: str, **options: Any) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(url, **options)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def run(url: str, body: Callable[[PostgresStore], Awaitable[T]], **options: Any) -> T:
    """Open a store on ``url``, run ``body(store)`` on a fresh loop, always close it."""

    async def main() -> T:
        async with opened(url, **options) as store:
            return await body(store)

    return asyncio.run(main())


def job(user: str = "ann", key: str | None = None, **fields: Any) -> NewJob:
    return NewJob(user=user, task="add", idempotency_key=key, **fields)


def test_submit_and_get_round_trip(url: str) -> None:
    async def body(store: PostgresStore) -> None:
        assert store.exclusive is False  # shared by nodes: recover(all_others) is unsafe
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

    run(url, body)


def test_jobs_survive_a_new_store_object(url: str) -> None:
    async def write(store: PostgresStore) -> list[str]:
        done, _ = await store.submit(job())
        await store.claim([done.id], "w1", 60)
        assert await store.finish(done.id, "w1", JobState.SUCCEEDED, result={"sum": 3})
        waiting, _ = await store.submit(job(key="k"))
        return [done.id, waiting.id]

    ids = run(url, write)

    async def read(store: PostgresStore) -> None:
        done, waiting = await store.get(ids[0]), await store.get(ids[1])
        assert done is not None and done.state is JobState.SUCCEEDED
        assert done.result == {"sum": 3} and done.owner is None
        assert waiting is not None and waiting.state is JobState.QUEUED
        again, created = await store.submit(job(key="k"))
        assert again == waiting and not created  # the key survives too

    run(url, read)


def test_idempotency_key_is_per_user(url: str) -> None:
    async def body(store: PostgresStore) -> None:
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

    run(url, body)


def test_concurrent_idempotent_submits_make_one_job(url: str) -> None:
    async def main() -> None:
        async with opened(url) as one, opened(url) as two:  # two nodes, 20 connections
            stores = [one, two] * 10
            results = await asyncio.gather(*(s.submit(job(key="same")) for s in stores))
            assert len({j.id for j, _ in results}) == 1
            assert sum(created for _, created in results) == 1
            assert (await one.counts())[JobState.QUEUED] == 1

    asyncio.run(main())


def test_claim_skips_jobs_not_queued_and_counts_attempts(url: str) -> None:
    async def body(store: PostgresStore) -> None:
        a, b, c = [(await store.submit(job(args=[i])))[0] for i in range(3)]
        await store.cancel(b.id, "ann")
        claimed = await store.claim([c.id, b.id, "missing", a.id], "w1", 30)
        assert [j.id for j in claimed] == [c.id, a.id]
        for got in claimed:
            assert got.state is JobState.RUNNING and got.owner == "w1" and got.attempts == 1
            assert got.started_at is not None and got.lease_until == got.started_at + 30
            assert await store.get(got.id) == got
        assert await store.claim([a.id], "w2", 30) == []  # already running
        assert await store.claim([], "w2", 30) == []
        assert await store.release("w1", [a.id]) == 1
        (again,) = await store.claim([a.id], "w2", 30)
        assert again.attempts == 2 and again.owner == "w2"

    run(url, body)


def test_finish_only_by_the_owner_of_a_running_job(url: str) -> None:
    async def body(store: PostgresStore) -> None:
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

    run(url, body)


def test_non_json_values_write_nothing(url: str) -> None:
    async def body(store: PostgresStore) -> None:
        made, _ = await store.submit(job())
        await store.claim([made.id], "w1", 30)
        with pytest.raises(TypeError, match=r"result of job .* not a JSON value \(set"):
            await store.finish(made.id, "w1", JobState.SUCCEEDED, result={1, 2})
        for bad in (float("nan"), float("inf")):
            with pytest.raises(TypeError, match="not a JSON value"):
                await store.finish(made.id, "w1", JobState.SUCCEEDED, result=[bad])
        with pytest.raises(TypeError, match="NUL character"):  # JSONB cannot hold \u0000
            await store.finish(made.id, "w1", JobState.SUCCEEDED, result="a\x00b")
        still = await store.get(made.id)
        assert still is not None and still.state is JobState.RUNNING and still.owner == "w1"
        assert await store.finish(made.id, "w1", JobState.FAILED, error={"type": "TypeError"})
        with pytest.raises(TypeError, match="args"):
            await store.submit(job(args=[object()]))
        with pytest.raises(TypeError, match="kwargs"):
            await store.submit(job(kwargs={"x": float("nan")}))
        assert sum((await store.counts()).values()) == 1

    run(url, body)


def test_cancel(url: str) -> None:
    async def body(store: PostgresStore) -> None:
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

    run(url, body)


def test_release_heartbeat_and_recover(url: str) -> None:
    async def body(store: PostgresStore) -> None:
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

    run(url, body)


def test_queued_oldest_first_and_counts(url: str) -> None:
    async def body(store: PostgresStore) -> None:
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

    run(url, body)


def test_keys(url: str) -> None:
    async def body(store: PostgresStore) -> None:
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

    run(url, body)


def test_claim_next_takes_the_best_jobs_first(url: str) -> None:
    async def body(store: PostgresStore) -> None:
        low = [(await store.submit(job(args=[i])))[0] for i in range(3)]
        high = (await store.submit(job(priority=5)))[0]
        other = (await store.submit(NewJob("ann", "mul")))[0]
        first = await store.claim_next("w1", 2, 30)
        assert [j.id for j in first] == [high.id, low[0].id]
        assert all(j.state is JobState.RUNNING and j.attempts == 1 for j in first)
        for got in first:
            assert got.owner == "w1" and got.started_at is not None
            assert got.lease_until == got.started_at + 30
        assert [j.id for j in await store.claim_next("w2", 5, 30, tasks={"mul"})] == [other.id]
        assert await store.claim_next("w2", 5, 30, tasks=()) == []
        assert await store.claim_next("w2", 0, 30) == []
        assert [j.id for j in await store.claim_next("w2", 5, 30)] == [low[1].id, low[2].id]
        assert await store.claim_next("w2", 5, 30) == []

    run(url, body)


def test_concurrent_claim_next_never_claims_a_job_twice(url: str) -> None:
    n = 200

    async def main() -> None:
        async with opened(url, pool_size=4) as one, opened(url, pool_size=4) as two:
            made = await asyncio.gather(*(one.submit(job(args=[i])) for i in range(n)))
            claimed: list[tuple[str, str]] = []

            async def worker(store: PostgresStore, owner: str) -> None:
                # a claim may come back empty while others hold the first turns: a
                # worker stops only when nothing is queued any more
                while True:
                    batch = await store.claim_next(owner, 7, 60)
                    claimed.extend((j.id, owner) for j in batch)
                    if not batch and (await store.counts())[JobState.QUEUED] == 0:
                        return

            await asyncio.gather(
                *(
                    worker(s, f"{name}-{i}")
                    for name, s in [("a", one), ("b", two)]
                    for i in range(4)
                )
            )
            ids = [i for i, _ in claimed]
            assert len(ids) == len(set(ids)) == n  # no duplicates, nothing missed
            assert set(ids) == {j.id for j, _ in made}
            assert {owner[0] for _, owner in claimed} == {"a", "b"}  # both nodes took some
            counts = await two.counts()
            assert counts[JobState.RUNNING] == n and counts[JobState.QUEUED] == 0
            assert all(j.attempts == 1 for j in [await one.get(i) for i in ids[:20]] if j)

    asyncio.run(main())


def test_stores_opening_at_once_migrate_once(url: str) -> None:
    async def main() -> None:
        stores = [PostgresStore(url, pool_size=2) for _ in range(3)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
            made, _ = await stores[0].submit(job())
            assert all([await s.get(made.id) == made for s in stores])
        finally:
            for store in stores:
                await store.close()

    asyncio.run(main())
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM escala_schema").fetchall()
        assert rows == [(SCHEMA_VERSION,)]
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'escala%%' ORDER BY 1"
        ).fetchall()
        assert tables == [
            ("escala_api_keys",),
            ("escala_fair",),
            ("escala_jobs",),
            ("escala_schema",),
        ]


def test_newer_schemas_are_refused(url: str) -> None:
    run(url, lambda store: store.counts())
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE escala_schema SET version = %s", (SCHEMA_VERSION + 1,))

    async def main() -> None:
        store = PostgresStore(url)
        with pytest.raises(StoreError, match="newer than this escala knows"):
            await store.open()
        await store.close()

    asyncio.run(main())


def test_bad_url_and_no_server(pg_server: str) -> None:
    async def main(port: int) -> None:
        nobody = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        cases = [
            ("not a url", "not a PostgreSQL URL"),
            (nobody, rf"cannot connect to PostgreSQL at 127\.0\.0\.1:{port}: .*server running\?"),
            (make_conninfo(pg_server, dbname="no_such_db"), 'database "no_such_db" does not'),
        ]
        for bad, message in cases:
            store = PostgresStore(bad)
            with pytest.raises(StoreError, match=message):
                await store.open()
            await store.close()
            with pytest.raises(StoreError, match="store is closed"):
                await store.get("x")

    with socket_port() as port:  # bound, not listening: connections are refused
        asyncio.run(main(port))
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStore(pg_server, pool_size=0)


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_methods_need_an_open_store(url: str) -> None:
    async def main() -> None:
        store = PostgresStore(url)
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
