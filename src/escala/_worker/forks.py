"""A task that forks: the child must not go on with the batch, or with the caller's code.

A task may call ``os.fork()``, itself or through a library. If the child returns from the
task instead of ending with ``os._exit``, it is back in escala's loop, a copy of the
worker: it would run the rest of the batch a second time and, in sequential mode, return
into the caller's program and run *that* a second time. CPython offers no way to tell a
child where it came from but a hook run at fork, so each worker marks what it is running
(:func:`running`, one record per thread, or per asyncio task for async mode); the hook
marks the record of the thread that forked, and empties its feed of items, so that the
batch fast path's loop stops after the current task. The worker checks the mark after
each task and ends the child there with :func:`exit_child`.

A fork outside any task (escala's own worker processes, the user's ``multiprocessing``)
finds no record, or a record of a run the child never returns to, and is left alone.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Running", "exit_child", "in_async_task", "running"]


class Running:
    """What one worker thread (or async task) is running: the feed of its batch."""

    __slots__ = ("feed", "forked")

    def __init__(self, feed: Iterator[Any] | None = None) -> None:
        self.feed: Any = feed  # a list or tuple iterator: __setstate__ moves it
        self.forked = False


_local = threading.local()
# Async tasks share their loop's thread: each escala async task carries its own record.
_task: contextvars.ContextVar[Running | None] = contextvars.ContextVar(
    "escala_async_task", default=None
)


class running:  # lower case: used as a statement, like contextlib.suppress
    """Mark the calling thread as running a batch (``with forks.running(feed) as r:``)."""

    __slots__ = ("_previous", "record")

    def __init__(self, feed: Iterator[Any] | None = None) -> None:
        self.record = Running(feed)

    def __enter__(self) -> Running:
        self._previous = getattr(_local, "record", None)
        _local.record = self.record
        return self.record

    def __exit__(self, *_: object) -> None:
        _local.record = self._previous


def in_async_task() -> Running:
    """Mark the current asyncio task as an escala task; return its record."""
    record = Running()
    _task.set(record)
    return record


def exit_child() -> None:
    """End a child forked by a task, which has just returned from that task."""
    try:
        os.write(
            2,
            f"escala: a task forked, and the child (pid {os.getpid()}) returned from the task "
            "instead of ending with os._exit(); escala ends it here, so that it does not run "
            "the rest of the work again\n".encode(),
        )
        if _alone_at_fork:
            # what the child printed is kept, as multiprocessing keeps it for its children;
            # not when other threads ran at the fork: one may have held a stream's lock,
            # and the child would wait for it forever
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os._exit(0)


_alone_at_fork = True  # the forking process had a single thread


def _before_fork() -> None:
    global _alone_at_fork
    _alone_at_fork = threading.active_count() == 1


def _after_fork_in_child() -> None:
    record = getattr(_local, "record", None) or _task.get()
    if record is None:
        return
    record.forked = True
    feed = record.feed
    if feed is not None:
        try:
            feed.__setstate__(sys.maxsize)
        except (AttributeError, TypeError):  # pragma: no cover - feeds are list iterators
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
