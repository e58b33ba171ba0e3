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
    """The queues of the clients watching each job.

    Args:
        get: reads a user's job (``None``: missing or someone else's).
        limit: the most watchers at once, beyond which ``watch`` answers 503.
        poll: seconds between two reads of a watched job; ``None``: never (every change
            happens in this process).
    """

    def __init__(
        self,
        get: Callable[[str, str], Awaitable[Job | None]],
        limit: int,
        poll: float | None,
    ) -> None:
        self._get = get
        self._limit = limit
        self._poll = poll
        self._queues: dict[str, set[asyncio.Queue[Job | JobProgress]]] = {}
        self.count = 0

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._queues

    def publish(self, change: Job | JobProgress) -> None:
        """Hand a change of a job to everyone watching it."""
        job_id = change.id if isinstance(change, Job) else change.job_id
        for changes in self._queues.get(job_id, ()):
            changes.put_nowait(change)

    async def watch(
        self, user: str, job_id: str, timeout: float
    ) -> AsyncIterator[Job | JobProgress]:
        """Yield the user's job now and at every change, until it ends or ``timeout``.

        Between changes of state, yields the ``JobProgress`` its task reports. Yields
        nothing for a job that is missing or someone else's.

        Raises:
            Refused: too many watchers already (503).
        """
        if self.count >= self._limit:
            raise Refused(503, "too many open event streams and long-polls", 1)
        changes: asyncio.Queue[Job | JobProgress] = asyncio.Queue()
        queues = self._queues.setdefault(job_id, set())
        queues.add(changes)
        self.count += 1
        deadline = time.monotonic() + timeout
        try:
            job = await self._get(user, job_id)
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
                    looked = await self._get(user, job_id)
                    if looked is None or looked.state is job.state:
                        continue
                    change = looked
                if isinstance(change, Job):
                    job = change
                yield change
        finally:
            self.count -= 1
            queues.discard(changes)
            if not queues:
                self._queues.pop(job_id, None)
