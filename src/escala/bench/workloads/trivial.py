"""trivial: tasks far cheaper than any hand-off; running them inline is fastest."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .base import Prepared, Workload, scaled

__all__ = ["Trivial", "aone_more", "one_more"]

_TASKS = 20_000


def one_more(x: int) -> int:
    """Return ``x + 1``: a task of a few dozen nanoseconds."""
    return x + 1


async def aone_more(x: int) -> int:
    """The async form of :func:`one_more`: a coroutine per item only adds cost."""
    return x + 1


class Trivial(Workload):
    name = "trivial"
    title = "Tiny tasks (x + 1)"
    expected = "sequential"
    explanation = (
        "Handing a task to a thread, a coroutine or a process costs microseconds; when "
        "the task itself costs nanoseconds, every hand-off is pure loss."
    )

    @contextmanager
    def prepared(self, scale: float = 1.0) -> Iterator[Prepared]:
        yield Prepared(one_more, list(range(scaled(_TASKS, scale, least=10))), aone_more)
