"""What the PostgreSQL store does for nodes that share it: fair claims, backlog, messages.

The Store contract itself is in ``test_store.py`` (``open_store`` and ``is_shared`` too);
these are the extra duties of a ``SharedStore`` (the queue lives in the database, nodes
tell each other of changes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import psycopg

from escala.store import ApiKey, NewJob
from escala.store.postgres import _MIGRATIONS, SCHEMA_VERSION, PostgresStore


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def submit(store: PostgresStore, user: str, n: int, **fields: object) -> list[str]:
    """Submit ``n`` jobs of ``user`` one after another (so their order is known)."""
    return [(await store.submit(NewJob(user, "t", **fields)))[0].id for _ in range(n)]  # type: ignore[arg-type]


def test_claims_take_turns_between_users(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            ann = await submit(store, "ann", 6)
            bob = await submit(store, "bob", 2)
            first = await store.claim_next("w", 4, 30)
            # each user's next job in turn, however many the first user queued before
            assert [j.id for j in first] == [ann[0], bob[0], ann[1], bob[1]]
            rest = await store.claim_next("w", 10, 30)
            assert [j.id for j in rest] == ann[2:]

    asyncio.run(main())


def test_a_user_who_was_idle_comes_back_level_not_owed_the_past(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            ann = await submit(store, "ann", 5)
            assert [j.id for j in await store.claim_next("node-1", 3, 30)] == ann[:3]
            bob = await submit(store, "bob", 3)
            # ann has had three turns; bob gets one turn of credit, then they alternate
            took = await store.claim_next("node-2", 4, 30)
            assert [j.id for j in took] == [bob[0], ann[3], bob[1], ann[4]]

    asyncio.run(main())


def test_turns_are_remembered_between_claims(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            ann = await submit(store, "ann", 4)
            bob = await submit(store, "bob", 4)
            # one job per claim, as a node with one free slot claims: still alternating
            took = [(await store.claim_next("w", 1, 30))[0].id for _ in range(6)]
            assert took == [ann[0], bob[0], ann[1], bob[1], ann[2], bob[2]]

    asyncio.run(main())


def test_weights_and_priorities(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            await store.add_key(ApiKey("ann", "a" * 64, weight=2.0))
            ann = await submit(store, "ann", 4)
            bob = await submit(store, "bob", 2)
            urgent = await submit(store, "bob", 1, priority=9)
            took = [j.id for j in await store.claim_next("w", 6, 30)]
            # starts: ann 0, 0.5, 1, 1.5 (weight 2); bob 0, 1, 2, his urgent job first;
            # equal starts go to the older job
            assert took == [ann[0], urgent[0], ann[1], ann[2], bob[0], ann[3]]
            # and one at a time, ann still gets two turns for bob's one
            await submit(store, "ann", 4)
            await submit(store, "bob", 4)
            took = [(await store.claim_next("w", 1, 30))[0].user for _ in range(6)]
            assert took == ["bob", "ann", "ann", "ann", "bob", "ann"]

    asyncio.run(main())


def test_claims_of_some_tasks_only_and_backlog(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            await submit(store, "ann", 3)
            other = (await store.submit(NewJob("bob", "u")))[0]
            backlog = {(b.user, b.task): b for b in await store.backlog()}
            assert {k: b.count for k, b in backlog.items()} == {("ann", "t"): 3, ("bob", "u"): 1}
            assert all(0 <= b.oldest_wait < 60 for b in backlog.values())
            assert [j.id for j in await store.claim_next("w", 5, 30, tasks=["u"])] == [other.id]
            assert await store.claim_next("w", 5, 30, tasks=["v"]) == []
            assert {(b.user, b.count) for b in await store.backlog()} == {("ann", 3)}

    asyncio.run(main())


def test_many_claimers_share_a_long_queue_without_duplicates(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as one, opened(pg_url) as two:
            made = {
                job_id for user in ("ann", "bob", "cy") for job_id in await submit(one, user, 40)
            }
            seen: list[str] = []

            async def claimer(store: PostgresStore, owner: str) -> None:
                while True:
                    batch = await store.claim_next(owner, 5, 60)
                    seen.extend(j.id for j in batch)
                    if not batch and not await store.backlog():
                        return

            await asyncio.gather(*(claimer(s, f"n{i}") for i, s in enumerate([one, two] * 3)))
            assert sorted(seen) == sorted(made)

    asyncio.run(main())


def test_notify_reaches_every_listener_and_a_lost_connection_is_said(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as one, opened(pg_url) as two:
            heard: dict[str, asyncio.Queue[str]] = {"one": asyncio.Queue(), "two": asyncio.Queue()}
            listeners = [
                asyncio.create_task(one.listen(heard["one"].put_nowait)),
                asyncio.create_task(two.listen(heard["two"].put_nowait)),
            ]
            try:
                # LISTEN takes effect some time after the task starts: send until heard
                async with asyncio.timeout(20):
                    while heard["one"].empty() or heard["two"].empty():
                        await one.notify(["hello"])
                        await asyncio.sleep(0.05)
                for q in heard.values():
                    while not q.empty():
                        assert q.get_nowait() == "hello"
                await two.notify(["queued:cpu", "done:a,b"])
                for q in heard.values():
                    assert [await q.get(), await q.get()] == ["queued:cpu", "done:a,b"]
                # the server drops one listener's connection: it reconnects and says so
                with psycopg.connect(pg_url, autocommit=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query = 'LISTEN escala' AND pid <> pg_backend_pid()"
                    )
                async with asyncio.timeout(20):
                    for q in heard.values():
                        assert await q.get() == ""
            finally:
                for task in listeners:
                    task.cancel()
                await asyncio.gather(*listeners, return_exceptions=True)

    asyncio.run(main())


def test_a_store_at_schema_1_is_migrated(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE escala_schema (one boolean PRIMARY KEY, version integer)")
        for statement in _MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO escala_schema VALUES (true, 1)")
        conn.execute(
            'INSERT INTO escala_jobs (id, "user", task, args, kwargs, priority, state, '
            "attempts, created_at) VALUES ('old', 'ann', 't', '[]', '{}', 0, 'queued', 0, 1)"
        )

    async def main() -> None:
        async with opened(pg_url) as store:
            assert [j.id for j in await store.claim_next("w", 1, 30)] == ["old"]

    asyncio.run(main())
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM escala_schema").fetchall() == [(SCHEMA_VERSION,)]
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes").fetchall()}
        assert "escala_jobs_fair" in indexes
