"""The service's small types: refusals, outcomes, progress, lifecycle, error shapes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..store import JobState

__all__ = [
    "Carried",
    "JobProgress",
    "Lifecycle",
    "Refused",
    "RunResult",
    "TooManyAttempts",
    "UnknownTask",
    "cancelled_error",
    "console",
    "error_of",
    "report_progress",
    "reporter",
    "stop_loops",
    "yield_to_the_loop",
]

_MESSAGE_LIMIT = 2000


class Refused(Exception):
    """A request admission control turns away, with the status and when to come back."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class Carried(Exception):
    """What a task raised that an asyncio future cannot carry as it is.

    A future refuses ``StopIteration``, and ``SystemExit`` or ``KeyboardInterrupt``
    raised on the event loop would end it: the service carries them inside this, and
    ``error_of`` describes the exception carried.
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc) or type(exc).__name__)
        self.exc = exc


class TooManyAttempts(Exception):
    """A job whose server stopped or crashed under it too many times: it runs no more."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the server running this job stopped or crashed each of the {limit} times it "
            "ran; it is not run again"
        )


class UnknownTask(Exception):
    """A stored job of a task that the app no longer offers."""

    def __init__(self, task: str) -> None:
        super().__init__(f"task {task!r} is no longer offered")


class Lifecycle(enum.Enum):
    """Where the service is in its life."""

    NEW = "new"  # built, nothing started
    SERVING = "serving"  # pools up, store open, dispatching jobs
    STOPPING = "stopping"  # refusing new work, letting running jobs finish
    STOPPED = "stopped"  # everything released; cannot start again


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of a job, as the service reports it."""

    state: JobState
    result: Any = None
    error: dict[str, str] | None = None
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class JobProgress:
    """How far a running job has come, as its task reported it."""

    job_id: str
    done: float  # from 0 to 1
    note: str = ""


reporter: contextvars.ContextVar[Callable[[float, str], None]] = contextvars.ContextVar(
    "escala_progressreporter"
)


def report_progress(done: float, note: str = "") -> bool:
    """Tell the job's watchers (``/events``) how far the running task has come.

    Call it from an ``async`` task run by ``escala serve``; ``done`` is a fraction from 0
    to 1 (clamped), ``note`` a short text. Returns ``False``, and does nothing, anywhere
    else: in a plain function, which runs on a thread or in another process, progress
    does not travel.
    """
    report = reporter.get(None)
    if report is None:
        return False
    report(min(max(float(done), 0.0), 1.0), str(note)[:200])
    return True


def yield_to_the_loop() -> None:
    """Run CPU workers at a lower priority than the web process.

    When every core is busy, the kernel then lets the event loop run as soon as it wakes,
    instead of sharing its core with a worker: measured here, the loop's lag p99 under
    CPU saturation fell from 3.5–5.3 ms to 2.1–3.4 ms. Workers lose nothing on idle cores.
    """
    with contextlib.suppress(OSError):
        os.nice(10)


def error_of(exc: BaseException, what: str = "") -> dict[str, str]:
    """Describe a failure for the client: the type and message, never a traceback."""
    if isinstance(exc, Carried):
        exc = exc.exc
    message = str(exc) or type(exc).__name__
    if what:
        message = f"{what}: {message}"
    if len(message) > _MESSAGE_LIMIT:
        message = message[:_MESSAGE_LIMIT] + "…"
    return {"type": type(exc).__name__, "message": message}


def cancelled_error() -> dict[str, str]:
    return {"type": "Cancelled", "message": "cancelled by the user"}


def console(command: str) -> Callable[[str], None]:
    """Send the service's log to stderr as ``escala COMMAND: ...`` lines (unless the host
    program configured it), and return how to print an announcement there."""
    log = logging.getLogger("escala.service")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"escala {command}: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return lambda line: print(line, file=sys.stderr, flush=True)


async def stop_loops(loops: list[asyncio.Task[Any]], timeout: float = 5.0) -> None:
    """Cancel background loops and wait for them, ``timeout`` seconds at most.

    Bounded because a cancellation can be lost inside a library (psycopg's pool has had
    such races, psycopg/psycopg#1345): a shutdown must not hang on it. The loops also
    check a flag at every turn, so one that missed its cancel still ends by itself.
    """
    for task in loops:
        task.cancel()
    if not loops:
        return
    _, pending = await asyncio.wait(loops, timeout=timeout)
    for task in pending:
        logging.getLogger("escala.service").warning(
            "%s did not stop within %g s of being cancelled; leaving it", task.get_name(), timeout
        )
