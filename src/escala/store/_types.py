"""The Store and SharedStore protocols, and the types a store speaks.

Lifecycle of a job (``JobState``)::

    submit ──> QUEUED ──claim──> RUNNING ──finish──> SUCCEEDED | FAILED
                 │  ^               │
                 │  └── release / ──┘  (graceful shutdown, lease expired, owner dead)
                 │      recover
                 └──cancel──> CANCELLED <──cancel── RUNNING

Every method is a coroutine: a store may do its I/O on threads (SQLite) or on the event
loop (psycopg), and the service must never block its loop on either.

A store that many nodes use at once (``SharedStore``: PostgreSQL) is itself the queue:
nodes claim the fairest next jobs from it and tell each other of changes through it,
instead of keeping a queue in memory.

The implementations import this module, never the package's ``__init__``, which loads
them lazily (``open_store``): the types sit below both.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

__all__ = [
    "ApiKey",
    "Backlog",
    "Job",
    "JobState",
    "NewJob",
    "SharedStore",
    "Store",
    "StoreError",
    "is_shared",
]


class StoreError(Exception):
    """The store cannot do what was asked (a corrupt file, a locked database, a bad URL)."""


class JobState(enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"  # accepted and durable; waiting for a worker
    RUNNING = "running"  # claimed by one owner, who holds a lease on it
    SUCCEEDED = "succeeded"  # finished; ``result`` holds the return value
    FAILED = "failed"  # finished; ``error`` says why (no traceback: clients see it)
    CANCELLED = "cancelled"  # cancelled by its user before it finished

    @property
    def final(self) -> bool:
        """Return whether the job will never change again."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as a client submits it. ``args``/``kwargs`` are JSON values, never code."""

    user: str
    task: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0  # higher runs first among one user's jobs
    idempotency_key: str | None = None  # unique per user: the same key gives the same job


@dataclass(frozen=True, slots=True)
class Job:
    """A job as the store holds it. Times are Unix timestamps (``time.time()``).

    The stores' tables have these columns, in this order (``_common.JOB_FIELDS``).
    """

    id: str
    user: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: int
    idempotency_key: str | None
    state: JobState
    attempts: int  # how many times a worker claimed it (>1 after a crash: at-least-once)
    created_at: float
    started_at: float | None = None  # last claim
    finished_at: float | None = None
    result: Any = None  # a JSON value, when SUCCEEDED
    error: dict[str, str] | None = None  # {"type": ..., "message": ...}, when FAILED/CANCELLED
    owner: str | None = None  # who holds the lease, while RUNNING
    lease_until: float | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key's record. Only the key's hash is stored, never the key itself."""

    user: str
    key_hash: str  # hex SHA-256 of the key
    weight: float = 1.0  # share of the machine against other users (fair scheduling)
    rate: float | None = None  # jobs per second allowed (token bucket); None: no limit
    burst: int | None = None  # bucket size; None: ``max(1, 2 * rate)``
    created_at: float = 0.0


class Store(Protocol):
    """What the service needs from a job store. Every write is durable when it returns.

    Every method raises ``StoreError`` when the store is closed or its database fails.
    ``submit`` and ``finish`` raise ``TypeError``, writing nothing, for arguments or a
    result that are not strict JSON values (NaN and infinities included), or that the
    database cannot hold (PostgreSQL: a NUL character in a string); ``finish`` raises
    ``ValueError`` for a state other than SUCCEEDED or FAILED.
    """

    #: The queue lives in the store and many nodes share it (a ``SharedStore``): a node
    #: claims its work from the store, not from a queue kept in its own memory.
    shared: bool
    #: Only this server uses the store while it is open, so a job RUNNING for any other
    #: owner at start-up is a dead server's: ``recover(all_others=True)`` is then safe.
    exclusive: bool

    async def open(self) -> None:
        """Create or migrate the schema and get ready. Raises ``StoreError``."""

    async def close(self) -> None:
        """Finish pending writes and release every resource. Safe to call twice."""

    async def submit(self, job: NewJob) -> tuple[Job, bool]:
        """Commit a new QUEUED job; return it and ``True``.

        When ``job.idempotency_key`` was already used by the same user, return the job
        that key created and ``False`` instead (whatever its state, whatever was sent).
        """

    async def get(self, job_id: str) -> Job | None:
        """Return the job, or ``None`` when there is no such job."""

    async def find(self, user: str, idempotency_key: str) -> Job | None:
        """Return the user's job made with that idempotency key, or ``None``."""

    async def claim(self, job_ids: Sequence[str], owner: str, lease: float) -> list[Job]:
        """Move those of ``job_ids`` that are still QUEUED to RUNNING for ``owner``.

        Each claimed job gets ``attempts + 1``, ``started_at = now`` and
        ``lease_until = now + lease``. Jobs no longer QUEUED (cancelled meanwhile) are
        skipped. Returns the claimed jobs, in the order of ``job_ids``.
        """

    async def heartbeat(self, owner: str, lease: float) -> int:
        """Extend the lease of every RUNNING job of ``owner`` to ``now + lease``; count them."""

    async def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        result: Any = None,
        error: Mapping[str, str] | None = None,
    ) -> bool:
        """Record the end of a RUNNING job held by ``owner``; ``False`` if it is not.

        ``state`` is SUCCEEDED or FAILED. ``False`` means the job was cancelled, or its
        lease was lost and someone else may run it: the result is dropped.
        """

    async def cancel(self, job_id: str, user: str) -> Job | None:
        """Cancel the user's job if it is QUEUED or RUNNING; return it as it now is.

        Returns ``None`` when the job does not exist or belongs to another user. A job
        already final is returned unchanged.
        """

    async def release(self, owner: str, job_ids: Sequence[str]) -> int:
        """Put RUNNING jobs of ``owner`` back to QUEUED (graceful shutdown); count them."""

    async def recover(self, owner: str, *, all_others: bool = False) -> int:
        """Put back to QUEUED every RUNNING job whose lease has expired; count them.

        With ``all_others``, also those of any owner other than ``owner``: right for a
        store that only one server may open at a time (``exclusive``), where such owners
        are dead.
        """

    async def queued(self) -> list[Job]:
        """Return every QUEUED job, oldest first (to rebuild the scheduler at start)."""

    async def counts(self) -> dict[JobState, int]:
        """Return how many jobs are in each state."""

    async def add_key(self, key: ApiKey) -> None:
        """Store a key record. Raises ``StoreError`` when the user already has a key."""

    async def remove_key(self, user: str) -> bool:
        """Delete the user's key; ``False`` when there was none."""

    async def keys(self) -> list[ApiKey]:
        """Return every key record."""


@dataclass(frozen=True, slots=True)
class Backlog:
    """Queued jobs of one user and one task, as a shared store counts them."""

    user: str
    task: str
    count: int
    oldest_wait: float  # seconds the oldest of them has waited (the database's clock)


class SharedStore(Store, Protocol):
    """A store that several nodes (``serve`` and ``worker`` processes) use at once.

    The queue lives in the store (``shared`` is always ``True``): a node never assumes
    that another owner is dead (``exclusive`` is ``False``), and takes work with
    ``claim_next`` rather than from a queue of its own.
    """

    async def claim_next(
        self, owner: str, n: int, lease: float, tasks: Collection[str] | None = None
    ) -> list[Job]:
        """Claim up to ``n`` QUEUED jobs, fairest first, so that no two nodes get one job.

        Fairest: users take turns, each turn worth ``1 / weight`` of the user's key, and
        the turns are counted across every node (a user's service so far is in the
        store); a user who was idle comes back level with the others, not ahead.
        """

    async def backlog(self) -> list[Backlog]:
        """Return the queued jobs counted by user and task."""

    async def notify(self, messages: Sequence[str]) -> None:
        """Send short text messages to every node that ``listen``s, at once."""

    async def listen(self, on_message: Callable[[str], None]) -> None:
        """Call ``on_message`` with every message sent by ``notify``, until cancelled.

        Reconnects by itself when the connection is lost; ``on_message("")`` says that
        messages may have been missed meanwhile.
        """


def is_shared(store: Store) -> TypeGuard[SharedStore]:
    """Return whether several nodes may use ``store`` at once (it holds the queue)."""
    return store.shared
