"""Typed, frozen option objects: what a caller asks for, checked once at the door."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypedDict, get_args

from ._errors import SendError

__all__ = [
    "ENGINES",
    "MODES",
    "CallOptions",
    "ErrorPolicy",
    "Mode",
    "Options",
    "Retry",
    "RunOptions",
    "StartMethod",
    "WorkerOptions",
    "engine_of",
]

Mode = Literal["auto", "sequential", "threads", "processes", "async", "dask", "ray"]
ErrorPolicy = Literal["raise", "collect"]
StartMethod = Literal["fork", "forkserver", "spawn"]

#: The modes that run on an optional engine's cluster; each needs its extra installed
#: (``pip install 'escala[dask]'``, ``'escala[ray]'``).
ENGINES: tuple[str, ...] = ("dask", "ray")
#: The execution models of this machine, which need nothing beyond escala (``"auto"``
#: chooses among them, and every behaviour test runs under each). The engines are kept
#: apart: they may be missing, auto never chooses them, and their tests need a cluster.
MODES: tuple[str, ...] = tuple(m for m in get_args(Mode)[1:] if m not in ENGINES)
_MAX_BATCH = (1 << 20) - 1  # _worker.slots.UNTRACKED, a layer above this one; a test pins it
_PLANNED: dict[str, str] = {}
#: The schemes of Dask's comms: an address that starts with one names a Dask scheduler.
DASK_SCHEMES = ("tcp", "tls", "ucx", "inproc", "ws", "wss")
# host:port, the host a name, an IPv4 address or a bracketed IPv6 address
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")


def engine_of(address: str) -> str:
    """Return the engine (``"dask"`` or ``"ray"``) whose cluster an address names.

    The rule, from the address's form alone: a Dask comm scheme (``tcp://``, ``tls://``,
    ``ucx://``, ``inproc://``, ``ws://``, ``wss://``) is a Dask scheduler, as Dask prints
    it; ``ray://`` (Ray Client), ``"auto"`` and a bare ``host:port`` (a Ray head's GCS, as
    ``ray start --head`` prints it) are Ray. Nothing is contacted.

    Raises:
        ValueError: the address has another form (a scheme of neither engine, no port).
    """
    scheme, sep, _ = address.strip().partition("://")
    if sep:
        if scheme.lower() in DASK_SCHEMES:
            return "dask"
        if scheme.lower() == "ray":
            return "ray"
    elif address.strip() == "auto" or _HOST_PORT.fullmatch(address.strip()):
        return "ray"
    raise ValueError(
        f"cannot tell which engine runs the cluster at {address!r}: write a Dask scheduler "
        "as Dask prints it ('tcp://10.0.0.5:8786', or tls://), a Ray cluster as "
        "'10.0.0.5:6379' (its head's GCS) or 'ray://10.0.0.5:10001' (Ray Client); or "
        "choose mode='dask' or mode='ray' yourself"
    )


@dataclass(frozen=True, slots=True)
class Retry:
    """When and how often to run a failed task again.

    Delays grow exponentially (``backoff * 2**n``, capped at ``max_backoff``); with
    ``jitter`` each delay is drawn uniformly from ``[0, delay]`` ("full jitter"), so that
    many tasks failing together do not all come back at the same instant.

    Args:
        attempts: how many times a failed task may run again (0 = never).
        on: the exception types worth retrying. A task whose argument cannot be sent to a
            worker (:class:`~escala.SendError`) is never retried: it would fail again.
        backoff: the first delay, in seconds.
        max_backoff: the longest delay, in seconds.
        jitter: draw each delay at random below its ceiling.
    """

    attempts: int = 0
    on: tuple[type[BaseException], ...] = (Exception,)
    backoff: float = 0.1
    max_backoff: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"retries must be an int, got {self.attempts!r}")
        if self.attempts < 0:
            raise ValueError(f"retries must be 0 or more, got {self.attempts}")
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        for exc_type in on:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise TypeError(f"Retry(on=...) takes exception types, got {exc_type!r}")
        object.__setattr__(self, "on", on)
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"Retry({name}=...) must be a finite number >= 0, got {value!r}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Return the pause before retry number ``attempt`` (1 for the first retry)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return ceiling * rand() if self.jitter else ceiling

    def should_retry(self, error: BaseException, attempts_made: int) -> bool:
        """Say whether a task that failed with ``error`` after ``attempts_made`` runs goes again."""
        if attempts_made > self.attempts or isinstance(error, SendError):
            return False
        return isinstance(error, self.on)


@dataclass(frozen=True, slots=True)
class Options:
    """Everything that shapes a run, validated once.

    Args:
        mode: the execution model, or ``"auto"`` (measure the work and choose). ``None``
            is ``"auto"`` for ``map``/``imap``; for ``amap``/``aimap``, async for coroutine
            functions and threads for plain ones; for a ``Pool``, threads.
        workers: how many tasks run at once; ``None`` means the usable cores for processes,
            ``min(32, cores + 4)`` for threads and 100 for async.
        batch: tasks sent to a worker at once; ``"auto"`` sizes batches from measured batch
            time in processes mode and sends single tasks elsewhere.
        timeout: seconds one task may run before it fails with :class:`~escala.TaskTimeout`.
        retries: a :class:`Retry` policy.
        errors: ``"raise"`` raises the first failure and cancels the rest; ``"collect"``
            returns an :class:`~escala.Outcome` for every item and keeps going.
        progress: show a progress bar on stderr; a string also names the bar.
        initializer: called once in each worker before its first task.
        initargs: arguments for ``initializer``.
        start_method: how worker processes start (processes mode); ``None`` is ``"fork"``
            on Linux and ``"spawn"`` elsewhere.
        window: most tasks pulled from the input and not yet handed back to the caller;
            ``None`` is ``2 × workers × batch``.
        address: a cluster to run on. For ``mode="dask"``, the Dask scheduler
            (``"tcp://10.0.0.5:8786"``); ``None`` uses the current Dask client if there is
            one (``distributed.Client(...)`` made it the default, or
            ``client.as_current()``), else starts a local cluster of one worker process per
            usable core and stops it at the end. For dask, ``workers`` is how many tasks
            escala keeps running on the cluster (default: its worker threads). For
            ``mode="ray"``, the Ray cluster to connect to (``"10.0.0.5:6379"``,
            ``"auto"``); ``None`` runs on this process's Ray connection if ``ray.init`` was
            called, else starts a local Ray with one CPU per usable core and shuts it down
            at the end. For ``mode="auto"`` (``map`` and ``imap``), a cluster to weigh: its
            engine comes from the address's form (:func:`engine_of`), escala times empty
            tasks there and runs there only when the tasks are long enough to pay for what
            one costs; without an address, auto never runs on a cluster.
    """

    mode: Mode | None = None
    workers: int | None = None
    batch: int | Literal["auto"] = "auto"
    timeout: float | None = None
    retries: Retry = field(default_factory=Retry)
    errors: ErrorPolicy = "raise"
    progress: bool | str = False
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    start_method: StartMethod | None = None
    window: int | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in ("auto", *MODES, *ENGINES):
            modes = ", ".join(repr(m) for m in ("auto", *MODES, *ENGINES))
            hint = _PLANNED.get(str(self.mode), "choose one of {modes}").format(modes=modes)
            raise ValueError(f"unknown mode {self.mode!r}: {hint}")
        _positive_int("workers", self.workers)
        if self.batch != "auto":
            _positive_int("batch", self.batch)
            if self.batch >= _MAX_BATCH:
                raise ValueError(f"batch must be below {_MAX_BATCH:,}, got {self.batch:,}")
        if self.timeout is not None and not (
            isinstance(self.timeout, int | float)
            and not isinstance(self.timeout, bool)
            and self.timeout > 0
            and math.isfinite(self.timeout)
        ):
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout!r}")
        if not isinstance(self.retries, Retry):
            raise TypeError(f"retries must be an int or escala.Retry, got {self.retries!r}")
        if self.errors not in ("raise", "collect"):
            raise ValueError(f"errors must be 'raise' or 'collect', got {self.errors!r}")
        if self.initializer is not None and not callable(self.initializer):
            raise TypeError(f"initializer must be callable, got {self.initializer!r}")
        if not isinstance(self.initargs, tuple):
            raise TypeError(f"initargs must be a tuple, got {type(self.initargs).__name__}")
        if self.start_method not in (None, "fork", "forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'fork', 'forkserver' or 'spawn', got {self.start_method!r}"
            )
        _positive_int("window", self.window)
        if self.address is not None:
            if not isinstance(self.address, str) or not self.address.strip():
                raise TypeError(
                    f"address must be a Dask scheduler address such as "
                    f"'tcp://127.0.0.1:8786' or a Ray cluster address such as "
                    f"'127.0.0.1:6379', got {self.address!r}"
                )
            if self.mode not in (None, "auto", *ENGINES):
                raise needs_cluster_mode(self.mode)
            if self.mode in (None, "auto"):
                engine_of(self.address)  # an address of neither engine: refused at the door
            elif "://" in self.address:
                try:
                    engine = engine_of(self.address)
                except ValueError:
                    engine = self.mode  # a scheme of neither: the engine itself judges it
                if engine != self.mode:
                    raise ValueError(
                        f"address={self.address!r} names a {engine.title()} cluster, "
                        f"not a {str(self.mode).title()} one: give the address of a "
                        f"{str(self.mode).title()} cluster, or mode={engine!r}"
                    )

    @classmethod
    def build(cls, base: Options | None = None, **given: Any) -> Options:
        """Return ``base`` (or the defaults) with the explicitly given keywords applied.

        ``retries`` may be given as an int and becomes ``Retry(attempts=n)``.
        """
        given = {k: v for k, v in given.items() if v is not _UNSET}
        unknown = sorted(set(given) - set(cls.__dataclass_fields__))
        if unknown:
            import difflib

            name = unknown[0]
            close = difflib.get_close_matches(name, cls.__dataclass_fields__, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown option {name!r}{hint}")
        retries = given.get("retries")
        if retries is not None and not isinstance(retries, Retry):
            given["retries"] = Retry(attempts=retries)
        return replace(base, **given) if base is not None else cls(**given)


def needs_cluster_mode(mode: object) -> ValueError:
    """The error for ``address=`` with a mode that runs on this machine."""
    return ValueError(
        "address= names a cluster: it needs mode='dask', mode='ray', or mode='auto' "
        f"(with escala.map or escala.imap, which weigh the cluster), not mode={mode!r}"
    )


class _Unset:
    """Marks a keyword the caller did not pass, so a Pool's defaults show through."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def _positive_int(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be 1 or more, got {value}")


class CallOptions(TypedDict, total=False):
    """Keyword options that may change from one call to the next (see :class:`Options`)."""

    batch: int | Literal["auto"]
    timeout: float | None
    retries: int | Retry
    progress: bool | str
    window: int | None


class WorkerOptions(CallOptions, total=False):
    """Keyword options that also shape the workers: fixed once a pool exists."""

    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    start_method: StartMethod | None
    address: str | None


class RunOptions(WorkerOptions, total=False):
    """Keyword options of the one-shot entry points (``map``, ``imap``, ``amap``)."""

    mode: Mode | None
    workers: int | None
