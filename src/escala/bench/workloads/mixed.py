"""mixed: a little Python computing, then a longer wait: still I/O-bound, threads win."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .base import Prepared, Workload, scaled
from .cpu_python import spin

__all__ = ["Mixed", "amixed", "mixed"]

_TASKS = 40
_STEPS = 75_000  # about 3 ms of bytecode
_WAIT = 0.02


def mixed(steps: int) -> int:
    """Compute for about 3 ms holding the GIL, then wait 20 ms; return the checksum."""
    value = spin(steps)
    time.sleep(_WAIT)
    return value


async def amixed(steps: int) -> int:
    """The async form of :func:`mixed` (the computing part blocks the loop, as it would)."""
    value = spin(steps)
    await asyncio.sleep(_WAIT)
    return value


class Mixed(Workload):
    name = "mixed"
    title = "Compute 3 ms, wait 20 ms"
    expected = "threads"
    explanation = (
        "When waiting dominates, the few milliseconds of Python that hold the GIL "
        "barely matter: threads overlap the waits and need no process start."
    )

    @contextmanager
    def prepared(self, scale: float = 1.0) -> Iterator[Prepared]:
        tasks = scaled(_TASKS, scale, least=2)
        yield Prepared(mixed, [_STEPS + i for i in range(tasks)], amixed)
