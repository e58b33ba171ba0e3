"""Worker initializer and per-worker state: open a connection once per worker."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import escala


class Connection:
    """Stands in for a database connection: expensive to open, one per worker."""

    opened = 0

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.owner = f"{os.getpid()}/{threading.get_ident()}"
        self.uses = 0


def connect(dsn: str) -> None:
    escala.worker_state().db = Connection(dsn)


def query(x: int) -> tuple[str, str, int]:
    db = escala.worker_state().db
    db.uses += 1
    return db.dsn, db.owner, id(db)


def test_initializer_runs_once_per_worker_and_state_is_per_worker(mode: str) -> None:
    results = escala.map(
        query, range(40), mode=mode, workers=2, initializer=connect, initargs=("db://test",)
    )
    assert {dsn for dsn, _, _ in results} == {"db://test"}
    connections = {(owner, ident) for _, owner, ident in results}
    # each connection belongs to the worker that opened it: same process and thread
    owners = {owner for owner, _ in connections}
    assert len(connections) == len(owners)
    # (a plain function in async mode runs on threads, one state per thread)
    assert 1 <= len(connections) <= (1 if mode == "sequential" else 2)


def test_async_initializer_may_be_a_coroutine() -> None:
    async def open_session() -> None:
        await asyncio.sleep(0)
        escala.worker_state().session = "ready"

    async def use(x: int) -> str:
        return f"{escala.worker_state().session}-{x}"

    assert escala.map(use, [1, 2], mode="async", initializer=open_session) == ["ready-1", "ready-2"]


def test_state_is_not_shared_between_runs(mode: str) -> None:
    def remember(x: int) -> int:
        state = escala.worker_state()
        state.count = getattr(state, "count", 0) + 1
        return int(state.count)

    first = escala.map(remember, range(3), mode=mode, workers=1)
    second = escala.map(remember, range(3), mode=mode, workers=1)
    assert first == second == [1, 2, 3]


def test_worker_state_outside_a_task_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="only available inside a task"):
        escala.worker_state()


def test_pool_keeps_state_across_calls() -> None:
    with escala.Pool("threads", workers=1, initializer=connect, initargs=("db://pool",)) as pool:
        first = pool.map(query, [1])
        second = pool.submit(query, 2).result(timeout=30)
    assert first[0][2] == second[2]  # the same connection object served both calls
