"""The exceptions escala raises, and how a worker's error travels back.

A task that raises gets its *own* exception back in the caller, of the same type, exactly as
``[fn(x) for x in items]`` would raise it. escala adds the worker's traceback as the
``__cause__`` (a :class:`RemoteTraceback`) and a note naming the task. Everything escala itself
raises derives from :class:`EscalaError`::

    EscalaError
    ├── TaskError                 a task did not produce a result, for a reason outside fn
    │   ├── TaskTimeout           it ran past its timeout (also a TimeoutError)
    │   ├── WorkerDied            the process running it died (exit code or signal)
    │   ├── SendError             its argument could not be sent to a worker, or its
    │   │                         result or exception could not be sent back
    │   └── RemoteError           fn raised an exception that could not travel back as
    │                             itself; carries its type name, message and traceback
    ├── PoolClosed                work was submitted to a pool that is shut down
    ├── EngineMissing             the chosen mode needs an optional package
    └── BrokenWorker              workers cannot start at all (a failing initializer)

Each error writes its own message from the facts it is given (which task, the limit, the
worker, what became of the task): a backend passes only the phrase that is its own, such as
"its worker process 123 was killed with its process group and replaced", so the shared
wording is written once, here.

Option mistakes (an unknown mode, ``workers=0``) raise ``ValueError`` or ``TypeError`` at
the call, before any work starts.
"""

from __future__ import annotations

import signal

__all__ = [
    "BrokenWorker",
    "EngineMissing",
    "EscalaError",
    "PoolClosed",
    "RemoteError",
    "RemoteTraceback",
    "SendError",
    "TaskError",
    "TaskTimeout",
    "WorkerDied",
]

# What a worker killed by SIGKILL most likely met, and what to do about it.
_OOM_HINT = (
    "SIGKILL usually means the kernel's out-of-memory killer stopped it; check memory "
    "use, or run fewer tasks at once"
)


class EscalaError(Exception):
    """Base class of every error escala raises itself."""


class TaskError(EscalaError):
    """A task produced no result, for a reason outside the task's own code.

    Attributes:
        index: position of the task's item in the input (``None`` for ``Pool.submit``).
    """

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments do not survive the default exception pickling.
        return (_rebuild, (type(self), self.args, self.__dict__))


class TaskTimeout(TaskError, TimeoutError):
    """A task ran past its timeout.

    The message reads "task #3 ran past its 0.5s timeout; " followed by ``how``, and, for a
    task that could not be stopped, the advice to use processes mode.

    Args:
        index: position of the task's item in the input.
        timeout: the limit in seconds.
        stopped: whether escala stopped the task, or had to abandon it still running.
        how: what became of the task, a phrase of the backend's own ("it was cancelled").
        took: seconds the task took, where it could only be measured once it returned.
        advise: advise processes mode when the task was not stopped (``False`` where that
            would not help, on a cluster).

    Attributes:
        timeout: the limit in seconds.
        stopped: whether escala could stop the task (processes and async) or had to
            abandon it still running (threads and sequential cannot be interrupted).
    """

    def __init__(
        self,
        index: int | None,
        timeout: float,
        *,
        stopped: bool,
        how: str,
        took: float | None = None,
        advise: bool = True,
    ) -> None:
        message = f"{_task(index)} ran past its {timeout:g}s timeout"
        if took is not None:
            message += f" (it took {took:.3g}s)"
        message += f"; {how}"
        if not stopped and advise:
            message += ". Use mode='processes' to stop runaway tasks."
        super().__init__(message, index=index)
        self.timeout = timeout
        self.stopped = stopped


class WorkerDied(TaskError):
    """The worker process running a task died before the task finished.

    The message reads "the worker process 123 running task #2 " followed by how it ended:
    ``how`` where the engine says only that it died, else what ``exitcode`` tells.

    Args:
        index: position of the task's item in the input.
        worker: the worker, as the message names it ("worker process 123").
        exitcode: the process's exit status, ``-N`` for signal ``N``, ``None`` if unknown.
        pid: the process id of the worker (``0`` if unknown).
        how: what the engine says of the death, where it gives no exit status; the
            out-of-memory hint follows it.

    Attributes:
        exitcode: the process's exit status, or ``-N`` when killed by signal ``N``.
        pid: the process id of the worker that died.
    """

    def __init__(
        self,
        index: int | None,
        *,
        worker: str,
        exitcode: int | None,
        pid: int,
        how: str | None = None,
    ) -> None:
        ended = describe_exit(exitcode) if how is None else f"{how}. {_OOM_HINT}"
        super().__init__(f"the {worker} running {_task(index)} {ended}", index=index)
        self.exitcode = exitcode
        self.pid = pid


class SendError(TaskError):
    """A task's argument, result or exception could not cross to or from a worker."""

    @classmethod
    def unloadable(cls, index: int, *, what: str, why: str, error: str, workers: str) -> SendError:
        """Say that what a task sent or returned did not load on the other side.

        Args:
            index: position of the task's item in the input.
            what: "argument (or function)" or "result".
            why: what went wrong ("could not be rebuilt in the caller").
            error: the exception that said so, as "TypeError: ...".
            workers: where the tasks run ("the worker process", "the Dask workers").
        """
        return cls(
            f"the {what} of task #{index} {why}: {error}. Everything a task takes and "
            f"returns must be importable by the same name in {workers} and in the caller.",
            index=index,
        )


class RemoteError(TaskError):
    """A task raised an exception that could not be sent back as itself.

    Attributes:
        type_name: the qualified name of the original exception's type.
    """

    def __init__(self, message: str, *, index: int | None = None, type_name: str) -> None:
        super().__init__(message, index=index)
        self.type_name = type_name


class PoolClosed(EscalaError, RuntimeError):
    """Work was submitted to a pool that has been shut down."""

    def __init__(self, message: str = "this pool is shut down; create a new one") -> None:
        super().__init__(message)


class EngineMissing(EscalaError, ImportError):
    """The chosen mode needs an optional package that is not installed."""


class BrokenWorker(EscalaError):
    """Workers cannot start: the initializer failed, or a worker dies before any task."""

    @classmethod
    def initializer(cls, error: str, *, where: str = "") -> BrokenWorker:
        """Say that the initializer failed.

        Args:
            error: what it raised, as "ValueError: ...".
            where: the worker it failed in ("a worker thread"), if there are several.
        """
        return cls(f"the initializer failed{f' in {where}' if where else ''}: {error}")


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker.

    escala sets it as the ``__cause__`` of the exception re-raised in the caller, so the
    worker's frames print under "The above exception was the direct cause of...", the way
    ``concurrent.futures`` does.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


def _task(index: int | None) -> str:
    return "a task" if index is None else f"task #{index}"


def _rebuild(cls: type[Exception], args: tuple[object, ...], state: dict[str, object]) -> Exception:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def describe_exit(exitcode: int | None) -> str:
    """Say in words how a process ended, from its ``exitcode``.

    Args:
        exitcode: ``Process.exitcode``: ``N >= 0`` for an exit status, ``-N`` for signal N.

    Returns:
        A phrase such as "was killed by signal SIGKILL (usually the kernel's
        out-of-memory killer)" or "exited with code 3".
    """
    if exitcode is None:
        return "disappeared without an exit status"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hint = {
        "SIGKILL": f" ({_OOM_HINT})",
        "SIGSEGV": " (a segmentation fault: a bug in native code the task called)",
        "SIGABRT": " (native code aborted)",
        "SIGBUS": " (a bus error: native code or a truncated memory-mapped file)",
    }.get(name, "")
    return f"was killed by {name}{hint}"
