"""Clients waiting on jobs (long-polls, event streams): who waits for what, and the news.

A change reaches the watchers of its job at once when it happens in this process. With
a shared store a job may end on another node: its news comes as a message (``publish``
from ``Service._heard_done``), and each watcher also reads its job again every ``poll``
seconds, in case a message was lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ..store import Job
from ._types import JobProgress, Refused

__all__ = ["Watchers"]


class Watchers:
    """The queues of the clients watching each job, and the bounds on how many watch.

    Args:
        get: reads a user's job (``None``: missing or someone else's).
        limit: the most watchers at once, beyond which a new one is refused (503).
        poll: seconds between two reads of a watched job; ``None``: never (every change
            happens in this process).
        per_user: the most watchers one user may have at once (429 beyond); default:
            ``limit``.
        reads: the most reads of watched jobs at once (``read``, a watch's first read,
            its polls). No admission gate bounds streams, which last: without this, 500
            opened at once would send 500 reads to the store at once, and the event
            loop's every turn would handle all of them.
    """

    def __init__(
        self,
        get: Callable[[str, str], Awaitable[Job | None]],
        limit: int,
        poll: float | None,
        *,
        per_user: int | None = None,
        reads: int = 16,
    ) -> None:
        self._store_get = get
        self._reads = asyncio.Semaphore(reads)
        self._limit = limit
        self._per_user = limit if per_user is None else per_user
        self._poll = poll
        self._queues: dict[str, set[asyncio.Queue[Job | JobProgress]]] = {}
        self._by_user: dict[str, int] = {}
        self.count = 0

    async def read(self, user: str, job_id: str) -> Job | None:
        """Read a user's job, waiting for one of the ``reads`` places."""
        async with self._reads:
            return await self._store_get(user, job_id)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._queues

    def publish(self, change: Job | JobProgress) -> None:
        """Hand a change of a job to everyone watching it."""
        job_id = change.id if isinstance(change, Job) else change.job_id
        for changes in self._queues.get(job_id, ()):
            changes.put_nowait(change)

    def claim(self, user: str) -> Callable[[], None]:
        """Take a watcher's place for ``user`` now; return what gives it back.

        Taken before a stream's first byte, so that a refusal is still an HTTP status;
        the function returned may be called any number of times, and gives the place
        back once.

        Raises:
            Refused: the user has ``per_user`` watchers already (429), or the server
                ``limit`` (503).
        """
        if self.count >= self._limit:
            raise Refused(503, "too many open event streams and long-polls on this server", 1)
        held = self._by_user.get(user, 0)
        if held >= self._per_user:
            raise Refused(
                429,
                f"{user!r} already has {held} event streams and long-polls open, the most "
                "one user may have",
                1,
            )
        self.count += 1
        self._by_user[user] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.count -= 1
            left = self._by_user[user] - 1
            if left:
                self._by_user[user] = left
            else:
                del self._by_user[user]

        return release

    async def watch(
        self, user: str, job_id: str, timeout: float
    ) -> AsyncIterator[Job | JobProgress]:
        """Claim a watcher's place, then ``follow`` the job; give the place back after.

        Raises:
            Refused: as ``claim``, at the first iteration.
        """
        release = self.claim(user)
        try:
            async for change in self.follow(user, job_id, timeout):
                yield change
        finally:
            release()

    async def follow(
        self, user: str, job_id: str, timeout: float
    ) -> AsyncIterator[Job | JobProgress]:
        """Yield the user's job now and at every change, until it ends or ``timeout``.

        Between changes of state, yields the ``JobProgress`` its task reports. Yields
        nothing for a job that is missing or someone else's. Counts against no bound:
        the caller holds a place from ``claim``.
        """
        changes: asyncio.Queue[Job | JobProgress] = asyncio.Queue()
        queues = self._queues.setdefault(job_id, set())
        queues.add(changes)
        deadline = time.monotonic() + timeout
        try:
            job = await self.read(user, job_id)
            if job is None:
                return
            yield job
            while not job.state.final:
                # a deadline per wait, not a timeout around the yields: a timeout would
                # fire in the consumer's code while it handles what was yielded
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    wait = left if self._poll is None else min(left, self._poll)
                    change = await asyncio.wait_for(changes.get(), wait)
                except TimeoutError:
                    if self._poll is None:
                        continue  # the deadline passed: the loop ends
                    looked = await self.read(user, job_id)
                    if looked is None or looked.state is job.state:
                        continue
                    change = looked
                if isinstance(change, Job):
                    job = change
                yield change
        finally:
            queues.discard(changes)
            if not queues:
                self._queues.pop(job_id, None)
