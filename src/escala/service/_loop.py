"""The event loop that ``escala serve`` and ``escala worker`` run on.

asyncio's own, with two guards for what one task or a flood of clients would otherwise
do to every request on the server:

- A timer at NaN seconds is refused. asyncio keeps its timers in a heap ordered by
  time, and NaN compares neither less nor more than anything: one task's
  ``asyncio.sleep(float("nan"))`` silently breaks the order, and other timers fire
  seconds late or never (0.5 s deadlines answered after 30 s, SIGTERM taking 31 s).
  Infinity is a fine time (``sleep(math.inf)`` sleeps for good): only NaN is refused.
- "Too many open files" while accepting is logged once per ``quiet`` seconds, without a
  traceback. asyncio logs each failed ``accept()`` with its traceback, and up to the
  listening socket's backlog of them per turn of the loop: 212 MB of log in 20 s, seen.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["FiniteTimersLoop", "quiet_accept_errors", "run"]

T = TypeVar("T")
log = logging.getLogger("escala.service")


class FiniteTimersLoop(asyncio.SelectorEventLoop):
    """An event loop that refuses timers at NaN, which would corrupt its timer heap."""

    def call_at(  # type: ignore[override]  # the same signature, less the TypeVarTuple
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        """Schedule ``callback`` at ``when``, as asyncio does.

        Raises:
            ValueError: ``when`` is NaN (a delay or a timeout of NaN seconds).
        """
        if math.isnan(when):
            raise ValueError("a delay or timeout of NaN seconds: it must be a number")
        return super().call_at(when, callback, *args, context=context)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on a ``FiniteTimersLoop``, as ``asyncio.run`` would."""
    with asyncio.Runner(loop_factory=FiniteTimersLoop) as runner:
        return runner.run(main)


def quiet_accept_errors(
    quiet: float = 10.0,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """Return a loop exception handler that logs running out of descriptors tersely.

    Args:
        quiet: seconds between two such lines; the failures meanwhile are counted.
    """
    last = -math.inf
    missed = 0

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last, missed
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)):
            loop.default_exception_handler(context)
            return
        now = loop.time()
        if now - last < quiet:
            missed += 1
            return
        since = f" ({missed} more since the last such line)" if missed else ""
        log.warning(
            "out of file descriptors: new connections wait, accepting resumes in 1 s%s",
            since,
        )
        last, missed = now, 0

    return handle
