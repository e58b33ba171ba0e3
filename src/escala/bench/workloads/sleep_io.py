"""sleep-io: tasks that only wait; any concurrent mode overlaps the waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .base import Prepared, Workload, scaled

__all__ = ["SleepIO", "asnooze", "snooze"]

_TASKS = 40
_WAIT = 0.02


def snooze(i: int) -> int:
    """Wait 20 ms, as a call to a slow service would, and return ``i``."""
    time.sleep(_WAIT)
    return i


async def asnooze(i: int) -> int:
    """The async form of :func:`snooze`."""
    await asyncio.sleep(_WAIT)
    return i


class SleepIO(Workload):
    name = "sleep-io"
    title = "Waiting (sleep)"
    expected = "threads"
    explanation = (
        "A task that only waits costs no CPU, so many can wait at once: threads or "
        "coroutines overlap the waits and finish in a fraction of the time."
    )

    @contextmanager
    def prepared(self, scale: float = 1.0) -> Iterator[Prepared]:
        yield Prepared(snooze, list(range(scaled(_TASKS, scale, least=2))), asnooze)
