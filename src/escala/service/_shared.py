"""The job queue when it lives in a database that several nodes share (PostgreSQL).

With SQLite one server holds the queue in memory (``FairQueue``) and the store only keeps
jobs durable. With a ``SharedStore`` any ``serve`` or ``worker`` process may run any job,
so the queue is the store's: claims are fair across all nodes (in SQL), and the nodes
tell each other of changes through the store::

    node A: submit ──> store ──NOTIFY "queued:cpu"──> every node's dispatcher claims
    node B: finish ──> store ──NOTIFY "done:<id>"───> the node where a client waits
    node A: cancel ──> store ──NOTIFY "cancel:<id>"─> the node running it stops it

Messages only make things quick; nothing depends on them. Each node also looks for work
every second, watchers re-read their job, and every third of a lease each node puts back
the jobs whose lease expired: a node that dies mid-job loses nothing for longer than a
lease, and nobody has to run a "retry stalled jobs" step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..store import Job, SharedStore
from ._admission import QueueDeadline
from ._types import stop_loops

__all__ = ["POLL", "SharedQueue"]

log = logging.getLogger("escala.service")

POLL = 1.0  # seconds a dispatcher waits for a message before it looks for work itself
REFRESH = 0.5  # seconds between two counts of the backlog (admission, dashboard)
_IDS_PER_MESSAGE = 200  # "done:" + 200 ids of 32 hex digits and commas: under 8,000 bytes


class SharedQueue:
    """One node's view of the queue in a shared store, and its messages to the others.

    Args:
        store: the shared store (open before ``start``).
        owner: this node's name on the jobs it claims.
        lease: seconds a claim lasts unless renewed.
        tasks: the task names this node runs, by pool (``"cpu"``, ``"io"``).
        deadlines: the queue-wait detectors of admission control, by pool: fed with
            how long the oldest queued job of the pool has waited, on any node.
        wake: called with a pool's name when it may have work.
        on_done: called with the id of a job another node (or this one) finished.
        on_cancel: called with the id of a job cancelled on some node.
        count: count the backlog twice a second (for a node that accepts jobs: admission
            control and the dashboard need it). A worker does not: with many workers the
            counts would be the database's heaviest reads.
    """

    def __init__(
        self,
        store: SharedStore,
        owner: str,
        lease: float,
        tasks: Mapping[str, Collection[str]],
        deadlines: Mapping[str, QueueDeadline],
        *,
        wake: Callable[[str], None],
        on_done: Callable[[str], None],
        on_cancel: Callable[[str], None],
        count: bool = True,
    ) -> None:
        self.store = store
        self._owner = owner
        self._lease = lease
        self._tasks = {pool: sorted(names) for pool, names in tasks.items()}
        self._pool_of = {name: pool for pool, names in tasks.items() for name in names}
        self._deadlines = deadlines
        self._wake, self._on_done, self._on_cancel = wake, on_done, on_cancel
        self._by_user: dict[str, int] = {}
        self._loops: list[asyncio.Task[Any]] = []
        self._queued: set[str] = set()  # pools with new jobs, to announce
        self._done: list[str] = []
        self._cancelled: list[str] = []
        self._pending = asyncio.Event()
        self._count = count
        self._serving = True  # the loops end at their next turn once this is False

    async def start(self) -> None:
        """Listen to the other nodes and start counting the backlog and reaping leases."""
        if self._count:
            await self._refresh()
        self._loops = [
            asyncio.create_task(self.store.listen(self._heard), name="escala-listen"),
            asyncio.create_task(self._announce(), name="escala-announce"),
            asyncio.create_task(self._watch(), name="escala-backlog"),
        ]

    async def stop(self) -> None:
        """Send what is left to say, then stop listening."""
        self._serving = False
        await stop_loops(self._loops)
        self._loops = []
        with contextlib.suppress(Exception):
            await self._flush()

    # -- what this node does ---------------------------------------------------------------

    async def claim(self, pool: str, n: int) -> list[Job]:
        """Claim up to ``n`` of the fairest queued jobs of ``pool`` that this node runs."""
        return await self.store.claim_next(self._owner, n, self._lease, self._tasks[pool])

    def queued(self, user: str, pool: str) -> None:
        """Say that a job of ``user`` was queued in ``pool`` (counted until the next count)."""
        self._by_user[user] = self._by_user.get(user, 0) + 1
        self._queued.add(pool)
        self._pending.set()

    def requeued(self) -> None:
        """Say that jobs of every pool went back to the queue (a node stopping, or reaping)."""
        self._queued.update(self._tasks)
        self._pending.set()

    def finished(self, job_id: str) -> None:
        """Say that a job ended here, for clients waiting on other nodes."""
        self._done.append(job_id)
        self._pending.set()

    def cancelled(self, job_id: str) -> None:
        """Say that a job was cancelled, so that the node running it stops it."""
        self._cancelled.append(job_id)
        self._pending.set()

    # -- what the backlog looks like ---------------------------------------------------------

    def depth(self, user: str) -> int:
        """Return how many jobs ``user`` has queued, on every node (as last counted)."""
        return self._by_user.get(user, 0)

    def depths(self) -> dict[str, int]:
        """Return the queued jobs of each user who has some."""
        return dict(self._by_user)

    def __len__(self) -> int:
        return sum(self._by_user.values())

    # -- loops -----------------------------------------------------------------------------

    def _heard(self, message: str) -> None:
        kind, _, what = message.partition(":")
        if kind == "queued" and what in self._tasks:
            self._wake(what)
        elif kind == "done":
            for job_id in what.split(","):
                self._on_done(job_id)
        elif kind == "cancel":
            self._on_cancel(what)
        elif not message:  # reconnected: whatever was said meanwhile is lost
            for pool in self._tasks:
                self._wake(pool)

    async def _announce(self) -> None:
        while self._serving:
            await self._pending.wait()
            try:
                await self._flush()
            except Exception as exc:
                # the others find the work by polling; nothing is lost, only slower
                log.warning("telling the other nodes failed (%s); they will poll", exc)
            # a burst of submissions becomes one message: pause before the next
            await asyncio.sleep(0.005)

    async def _flush(self) -> None:
        self._pending.clear()
        messages = [f"queued:{pool}" for pool in sorted(self._queued)]
        done, self._done = self._done, []
        messages += [
            "done:" + ",".join(done[i : i + _IDS_PER_MESSAGE])
            for i in range(0, len(done), _IDS_PER_MESSAGE)
        ]
        messages += [f"cancel:{job_id}" for job_id in self._cancelled]
        self._queued.clear()
        self._cancelled.clear()
        await self.store.notify(messages)

    async def _watch(self) -> None:
        """Count the backlog now and then; put back the jobs of nodes that died."""
        reap_every = max(REFRESH, self._lease / 3)
        since_reap = 0.0
        while self._serving:
            await asyncio.sleep(REFRESH)
            since_reap += REFRESH
            try:
                if self._count:
                    await self._refresh()
                if since_reap >= reap_every:
                    since_reap = 0.0
                    if recovered := await self.store.recover(self._owner):
                        log.warning(
                            "jobs whose node stopped renewing their lease, queued again: %d",
                            recovered,
                        )
                        self.requeued()
                        for pool in self._tasks:
                            self._wake(pool)
            except Exception as exc:
                log.warning("reading the shared queue failed (%s); retrying", exc)

    async def _refresh(self) -> None:
        by_user: dict[str, int] = {}
        oldest: dict[str, float] = {}
        for part in await self.store.backlog():
            by_user[part.user] = by_user.get(part.user, 0) + part.count
            pool = self._pool_of.get(part.task)
            if pool is not None:
                oldest[pool] = max(oldest.get(pool, 0.0), part.oldest_wait)
        self._by_user = by_user
        for pool, deadline in self._deadlines.items():
            if pool in oldest:
                deadline.observe(oldest[pool])
            else:
                deadline.idle()
