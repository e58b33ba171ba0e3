"""cpu-python: arithmetic in pure Python, which holds the GIL: only processes run it in parallel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .base import Prepared, Workload, scaled

__all__ = ["CpuPython", "spin"]

_TASKS = 8
_STEPS = 2_500_000  # about 100 ms of bytecode per task on a current x86 core


def spin(steps: int) -> int:
    """Run ``steps`` turns of a pure-Python loop and return a checksum of them."""
    total = 0
    for i in range(steps):
        total = (total + i * i) % 1_000_003
    return total


class CpuPython(Workload):
    name = "cpu-python"
    title = "Pure-Python arithmetic"
    expected = "processes"
    explanation = (
        "Python bytecode holds the GIL, so threads take turns on one core and only "
        "worker processes compute in parallel."
    )

    @contextmanager
    def prepared(self, scale: float = 1.0) -> Iterator[Prepared]:
        steps = scaled(_STEPS, scale, least=1000)
        # Slightly different sizes give every task its own result.
        yield Prepared(spin, [steps + i for i in range(_TASKS)])
