"""cpu-nogil: SHA-256 over large buffers: hashlib releases the GIL, so threads run in parallel."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from .base import Prepared, Workload, scaled

__all__ = ["CpuNoGil", "digest"]

_TASKS = 8
_BUFFER = 1 << 20  # 1 MiB: far above the 2 KiB from which hashlib lets go of the GIL
_ROUNDS = 160  # 160 MiB hashed per task: about 100 ms with SHA extensions


def digest(task: tuple[int, int, int]) -> str:
    """Hash a ``size``-byte buffer of ``seed`` bytes ``rounds`` times; return the hex digest.

    Args:
        task: ``(seed, size, rounds)``; the buffer is built here, so that only three
            numbers cross to a worker process.
    """
    seed, size, rounds = task
    buffer = bytes([seed % 256]) * size
    hasher = hashlib.sha256()
    for _ in range(rounds):
        hasher.update(buffer)  # the GIL is released while each update runs
    return hasher.hexdigest()


class CpuNoGil(Workload):
    name = "cpu-nogil"
    title = "SHA-256 in native code"
    expected = "threads"
    explanation = (
        "hashlib releases the GIL while it hashes large buffers, so threads compute on "
        "every core without the cost of starting processes."
    )

    @contextmanager
    def prepared(self, scale: float = 1.0) -> Iterator[Prepared]:
        rounds = scaled(_ROUNDS, scale)
        yield Prepared(digest, [(seed, _BUFFER, rounds) for seed in range(_TASKS)])
