"""Telling a real Ctrl-C from a ``KeyboardInterrupt`` that a task raises itself.

Both are the same exception, but they mean opposite things: a task's is that task's
outcome (collected with ``errors="collect"``, else raised with its index, like any
failure), while a Ctrl-C must stop the whole run at once. Off the main thread the
question does not arise: Python delivers SIGINT to the main thread alone, and escala's
worker processes ignore it. Tasks that run *on* the main thread (sequential mode, and
``async def`` tasks there) can meet both. While such a run lasts, escala puts a handler of
its own in place of Python's default one; it does the same (raises ``KeyboardInterrupt``)
and counts the signals, so a ``KeyboardInterrupt`` with no signal behind it is the task's.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["Watch", "ctrl_c_check"]

_signals = 0  # SIGINTs seen by our handler
_users = 0  # runs that asked for the handler


def _handler(signum: int, frame: FrameType | None) -> None:
    global _signals
    _signals += 1
    raise KeyboardInterrupt


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Watch:
    """Count Ctrl-C on the main thread while a run that executes tasks there lasts."""

    __slots__ = ("_installed",)

    def __init__(self) -> None:
        self._installed = False

    def start(self) -> None:
        global _users
        if not _on_main_thread():
            return
        if _users == 0 and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # the program has a handler of its own: leave it be
        _users += 1
        self._installed = True
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _handler)

    def stop(self) -> None:
        global _users
        if not self._installed:
            return
        self._installed = False
        _users -= 1
        if _users == 0 and _on_main_thread() and signal.getsignal(signal.SIGINT) is _handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def ctrl_c_check() -> Callable[[BaseException], bool] | None:
    """Return a test for "this exception is a real Ctrl-C", or ``None`` if none can be.

    Take it just before running tasks, and ask it about each ``BaseException`` a task
    lets out: the answer is true when the exception must stop the run rather than count
    as the task's outcome.
    """
    if not _on_main_thread():
        return None
    handler = signal.getsignal(signal.SIGINT)
    if handler is _handler:
        seen = _signals
        return lambda exc: isinstance(exc, KeyboardInterrupt) and _signals != seen
    if not callable(handler):
        return None  # ignored, or the default action (the process ends): never raised
    bound = getattr(handler, "func", handler)  # asyncio.Runner's is a functools.partial
    if isinstance(getattr(bound, "__self__", None), asyncio.Runner):
        # asyncio.run's handler turns the first Ctrl-C into a cancellation of the main
        # task (seen as such); a KeyboardInterrupt in a task is then the task's own
        return None
    # Python's default handler, or the program's own: a KeyboardInterrupt may be either,
    # and stopping is the safe side
    return lambda exc: isinstance(exc, KeyboardInterrupt)
