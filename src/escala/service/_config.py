"""The service's settings: one frozen object, checked when it is built."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, fields
from pathlib import Path

from .._worker.cpu import usable_cpus
from ..store import is_store_url, not_a_store_url

__all__ = ["ConfigError", "ServiceConfig"]


class ConfigError(ValueError):
    """A setting is out of range or contradicts another one."""


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Everything ``escala serve`` can be told. Defaults suit one machine and many users.

    Attributes:
        app: the module whose ``@escala.task`` functions the service runs (``tasks``).
        db: the SQLite file that holds jobs and API keys.
        store: a PostgreSQL URL (``postgresql://user@host/dbname``) to keep them in
            instead, shared with any other ``serve`` and ``worker`` process using it.
        executor: where this process runs jobs: ``"local"`` (its own process pool and
            threads), ``"none"`` (it only accepts them; workers run them: needs
            ``store``), or ``"ray"`` / ``"ray://HOST:PORT"`` (CPU tasks on a Ray cluster;
            plain ``"ray"`` joins this machine's Ray, or starts one).
        host, port: where to listen (port 0: any free port). Without API keys
            (``auth=False``), only a loopback address.
        auth: ``False`` lets anyone who can connect act as the user ``local``.
        cpu_workers: processes for CPU tasks; default: usable cores minus the web process.
        io_limit: I/O tasks running at once (async ones on the loop, others on threads).
        io_threads: threads for I/O tasks that are plain functions.
        job_timeout: seconds a job may run before it is stopped and marked failed.
        lease: seconds a running job's lease lasts; renewed every third of that.
        max_queued: jobs waiting in all, beyond which submissions get 503.
        max_queued_per_user: jobs one user may have waiting, beyond which they get 429.
        max_queue_wait: when jobs have waited longer than this for a whole second (a
            standing queue, as CoDel sees it), new submissions get 503.
        rate, burst: default per-user token bucket (jobs per second); ``None``: no limit.
            An API key may set its own.
        max_inflight, max_waiting: HTTP requests handled at once, and waiting for a slot.
        max_body: largest request body in bytes (413 beyond).
        max_reads: reads of a job's state (``GET`` and ``DELETE /v1/jobs/{id}``) handled
            at once, a bound of their own beside ``max_inflight``; the rest wait up to a
            second. Few, since the store answers them a few at a time: more at once only
            lengthen each turn of the event loop (300 clients polling one job, measured:
            /healthz p99 18 ms with 4, 76 ms with 16, 230 ms with 64; the same throughput).
        max_streams, max_streams_per_user: open long-polls and event streams at once, in
            all (503 beyond) and per user (429 beyond).
        max_connections: open HTTP connections, beyond which the longest idle one is
            closed to make room, or, when none is idle, a new one gets 503; ``None``:
            what the descriptor limit leaves after the files the server holds at start.
        header_timeout: seconds a connection may take to send a whole request head,
            counted from when it opens or sends the first byte of its next request.
        body_timeout: seconds a request may take to send its whole body (408 beyond).
        keep_alive: seconds an idle connection is kept open between two requests.
        grace: seconds running jobs get to finish on SIGTERM before they go back to the
            queue for the next start.
        max_attempts: a job interrupted this many times (its server stopped or crashed
            while it ran) fails instead of running again.
        admission: ``False`` turns off the in-flight gate and the queue-wait deadline
            (queue bounds and rate limits stay): only to show what admission control buys.
    """

    app: str | None = None
    db: Path = Path("escala.db")
    store: str | None = None
    executor: str = "local"
    host: str = "127.0.0.1"
    port: int = 8000
    auth: bool = True
    cpu_workers: int | None = None
    io_limit: int = 256
    io_threads: int = 32
    job_timeout: float = 300.0
    lease: float = 30.0
    max_queued: int = 200_000
    max_queued_per_user: int = 100_000
    max_queue_wait: float = 30.0
    rate: float | None = None
    burst: int | None = None
    max_inflight: int = 256
    max_waiting: int = 1024
    max_body: int = 1 << 20
    max_reads: int = 16
    max_streams: int = 10_000
    max_streams_per_user: int = 1_000
    max_connections: int | None = None
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: int = 30
    grace: float = 10.0
    max_attempts: int = 5
    admission: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "db", Path(self.db))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {
                "app",
                "db",
                "store",
                "executor",
                "host",
                "port",
                "auth",
                "rate",
                "burst",
                "cpu_workers",
                "admission",
                "max_connections",
            }:
                continue
            # NaN passes `<= 0`; a NaN or infinite duration reaching the event loop's
            # timers breaks their order (asyncio keeps them in a heap)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (0 < value < math.inf)
            ):
                raise ConfigError(f"{f.name} must be a positive finite number, got {value!r}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        for name in ("cpu_workers", "burst", "max_connections"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise ConfigError(f"rate must be positive (jobs per second), got {self.rate!r}")
        if self.store is not None and not is_store_url(self.store):
            raise ConfigError(f"store {not_a_store_url(self.store)}")
        if self.executor not in ("local", "none", "ray") and not self.executor.startswith("ray://"):
            raise ConfigError(
                f"executor must be local, none, ray or ray://HOST:PORT, got {self.executor!r}"
            )
        if self.executor == "none" and self.store is None:
            raise ConfigError(
                "executor none leaves jobs to `escala worker` processes, which need a store "
                "they can share: add --store postgresql://..."
            )
        if not self.auth and not is_loopback(self.host):
            raise ConfigError(
                f"--no-auth is only allowed on a loopback address, not {self.host!r}: "
                "create keys with `escala keys add NAME` and drop --no-auth"
            )

    @property
    def where(self) -> str | Path:
        """The store's URL, or the SQLite file."""
        return self.store if self.store is not None else self.db

    @property
    def cpu_pool_size(self) -> int:
        """Processes for CPU tasks: the usable cores minus the one the web process needs."""
        if self.executor == "none":
            return 0
        if self.cpu_workers is not None:
            return self.cpu_workers
        return max(1, usable_cpus() - 1)


def is_loopback(host: str) -> bool:
    """Return whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
