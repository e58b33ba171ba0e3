"""The protocol every built-in workload implements: :class:`Workload` and :class:`Prepared`.

A workload is a class with four descriptive attributes and one context manager,
:meth:`Workload.prepared`, that sets up what the work needs (a temporary folder, a local HTTP
server), yields the function and the items, and takes everything down again on exit.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

__all__ = ["Expected", "Prepared", "Workload", "scaled"]

#: The modes a correct advisor may choose for a plain function.
Expected = Literal["sequential", "threads", "processes"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A workload ready to run: the task, its items and, when natural, its ``async`` form.

    Attributes:
        fn: a module-level plain function, so that processes mode can send it by reference.
        items: the inputs, one task each.
        afn: a module-level ``async def`` returning exactly what ``fn`` returns, for async
            mode; ``None`` when the work has no natural async form (computing, disk).
    """

    fn: Callable[[Any], Any]
    items: list[Any]
    afn: Callable[[Any], Awaitable[Any]] | None = None


class Workload(abc.ABC):
    """A built-in piece of work that shows which execution model suits which kind of task.

    Attributes:
        name: the registry name, e.g. ``"cpu-python"``.
        title: a short human title for tables and charts.
        expected: the mode a correct advisor chooses for ``fn`` on a multi-core machine.
        explanation: one sentence: what this workload shows.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    expected: ClassVar[Expected]
    explanation: ClassVar[str]

    @abc.abstractmethod
    def prepared(self, scale: float = 1.0) -> AbstractContextManager[Prepared]:
        """Set up the workload, yield it ready to run, and leave nothing running on exit.

        Args:
            scale: multiplies the amount of work; 1.0 takes about a second sequentially
                on a current machine, tests use about 0.1.
        """

    def __repr__(self) -> str:
        return f"<workload {self.name}: {self.title}>"


def scaled(amount: int, scale: float, *, least: int = 1) -> int:
    """Return ``amount × scale`` rounded, and at least ``least``.

    Raises:
        ValueError: ``scale`` is not a positive number.
    """
    if not scale > 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    return max(least, round(amount * scale))
