"""What only the PostgreSQL job store does: claiming across nodes, migrations, connections.

The Store contract itself, which PostgreSQL keeps like every store, is in ``test_store.py``;
the duties of a ``SharedStore`` (fair claims, backlog, NOTIFY) in ``test_store_shared.py``.
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

from escala.store import JobState, NewJob, StoreError
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


def test_nul_characters_are_refused_before_anything_is_sent(url: str) -> None:
    """JSONB cannot hold ``\\u0000``: the store says so, and writes nothing (SQLite keeps it)."""

    async def body(store: PostgresStore) -> None:
        with pytest.raises(TypeError, match="args holds a NUL character"):
            await store.submit(job(args=["a\x00b"]))
        with pytest.raises(TypeError, match="kwargs holds a NUL character"):
            await store.submit(job(kwargs={"k": "\x00"}))
        made, _ = await store.submit(job())
        await store.claim([made.id], "w1", 30)
        with pytest.raises(TypeError, match="NUL character"):
            await store.finish(made.id, "w1", JobState.SUCCEEDED, result="a\x00b")
        still = await store.get(made.id)
        assert still is not None and still.state is JobState.RUNNING and still.owner == "w1"
        assert sum((await store.counts()).values()) == 1

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
