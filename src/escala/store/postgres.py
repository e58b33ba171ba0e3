"""A job store in PostgreSQL, shared by many escala nodes (``pip install escala[postgres]``).

Every operation is one short statement (two at most) on a connection borrowed from a
pool, in autocommit: no transaction stays open across an await of ours, and the
server's own group commit (``commit_delay``) batches the fsyncs of concurrent commits.
Times are epoch seconds from the *database's* clock, so the leases of nodes whose clocks
disagree still compare fairly::

    node A ──┐  claim_next: WITH next AS (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)
    node B ──┼─>            UPDATE … FROM next RETURNING …
    node C ──┘  (two nodes never claim the same job; neither waits for the other's rows)

Several nodes share one store, so none may assume that another owner is dead:
``exclusive`` is ``False`` and ``recover(all_others=True)`` is for single-server use
only. A node that dies stops heartbeating; its leases expire and any node's ``recover``
puts its jobs back in the queue.

``claim_next`` is fair between users in SQL, so that the fairness holds across every
node and not within each one: start-time fair queuing on a virtual time per user
(``escala_fair``), each turn worth ``1 / weight``. Users with equal weights take turns,
a user of weight 2 gets two turns for one, whichever nodes run the jobs.
Nodes tell each other of new, finished and cancelled jobs with ``NOTIFY`` on the
``escala`` channel; a node also polls, so a lost message only delays.

The schema is versioned in ``escala_schema``; ``open`` migrates it under a transaction-
level advisory lock, so nodes starting at once apply each migration exactly once. Every
table name starts with ``escala_``, so the store can share a database with others.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the PostgreSQL job store needs psycopg 3: pip install 'escala[postgres]'"
    ) from exc

from ._common import (
    CANCELLED,
    JOB_COLUMNS,
    KEY_COLUMNS,
    Lifecycle,
    already_opened,
    at_least_one,
    count_states,
    database_error,
    encode_job,
    encode_outcome,
    job_columns,
    job_from_row,
    key_row,
    key_taken,
    newer_schema,
    not_open,
    to_json,
)
from ._types import ApiKey, Backlog, Job, JobState, NewJob, StoreError

__all__ = ["CHANNEL", "SCHEMA_VERSION", "PostgresStore"]

log = logging.getLogger("escala.store")

#: The NOTIFY channel on which nodes sharing a database tell each other of changes.
CHANNEL = "escala"

# Any constant will do, as long as every escala node uses the same one: "escala" in ASCII.
_MIGRATION_LOCK = 0x657363616C61
_CONNECT_TIMEOUT = 10  # seconds, unless the URL says otherwise

# _MIGRATIONS[i] takes the schema from version i to version i + 1 (escala_schema.version).
_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE escala_jobs (
            id text PRIMARY KEY, "user" text NOT NULL, task text NOT NULL,
            args jsonb NOT NULL, kwargs jsonb NOT NULL, priority integer NOT NULL,
            idempotency_key text, state text NOT NULL, attempts integer NOT NULL,
            created_at double precision NOT NULL, started_at double precision,
            finished_at double precision, result jsonb, error jsonb, owner text,
            lease_until double precision,
            seq bigint GENERATED ALWAYS AS IDENTITY)""",
        "CREATE INDEX escala_jobs_state ON escala_jobs (state, created_at)",
        # what claim_next scans: the queue, best first
        """CREATE INDEX escala_jobs_next ON escala_jobs (priority DESC, created_at, seq)
            WHERE state = 'queued'""",
        """CREATE UNIQUE INDEX escala_jobs_idempotency ON escala_jobs ("user", idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        """CREATE TABLE escala_api_keys (
            "user" text PRIMARY KEY, key_hash text NOT NULL, weight double precision NOT NULL,
            rate double precision, burst integer, created_at double precision NOT NULL)""",
    ],
    [
        # what the fair claim ranks: each user's queue, best first
        """CREATE INDEX escala_jobs_fair ON escala_jobs ("user", priority DESC, created_at, seq)
            WHERE state = 'queued'""",
        # each user's virtual time: how much service it has had, in turns / weight
        """CREATE TABLE escala_fair (
            "user" text PRIMARY KEY, vtime double precision NOT NULL,
            charged double precision NOT NULL)""",
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)

_NOW = "extract(epoch FROM statement_timestamp())::float8"  # one instant per statement

_SCHEMA = """CREATE TABLE IF NOT EXISTS escala_schema (
    one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)"""
_GET = f"SELECT {JOB_COLUMNS} FROM escala_jobs WHERE id = %s"
_SELECT_KEY = f'SELECT {JOB_COLUMNS} FROM escala_jobs WHERE "user" = %s AND idempotency_key = %s'
_INSERT = (
    f"INSERT INTO escala_jobs ({JOB_COLUMNS}) VALUES (%s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, "
    f"'queued', 0, {_NOW}, NULL, NULL, NULL, NULL, NULL, NULL) "
    """ON CONFLICT ("user", idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING """
    f"RETURNING {JOB_COLUMNS}"
)
_CLAIM = (
    f"UPDATE escala_jobs SET state = 'running', attempts = attempts + 1, started_at = {_NOW}, "
    f"owner = %s, lease_until = {_NOW} + %s WHERE id = ANY(%s) AND state = 'queued' "
    f"RETURNING {JOB_COLUMNS}"
)
# The fair claim is start-time fair queuing, in one statement. Each user has a virtual
# time (escala_fair.vtime): the turns it has been given, each worth 1 / its key's weight.
# A user's k-th queued job starts at  max(vtime, floor) + (k - 1) / weight,  and the jobs
# with the earliest starts are claimed. ``floor`` (the latest virtual time among users
# with queued jobs, less one turn) keeps a user who was idle from being owed the past:
# it comes back level with the others, not ahead of them for hours.
#   users    each user with queued jobs: a skip scan of escala_jobs_fair, one index probe
#            per user, however long the queue;
#   ranked   each user's first jobs, best first (an index range per user, no sort);
#   fair     their start times, in order;
#   next     the first n that no other claimer has locked (SKIP LOCKED);
#   claimed  those jobs, now RUNNING;
#   charged  each claimed user's virtual time moved on, in user order (so that claimers
#            running at once lock the rows of escala_fair in one order: no deadlock).
# A window function cannot sit beside FOR UPDATE in one SELECT, hence the CTEs. Each user
# offers more candidates than one claim can take (per_user > n), so that claimers running
# at once, who lock the first turns, still find the next ones; the LIMIT on ``fair`` also
# tells the planner that few rows come out of it, so it probes them by primary key
# instead of scanning the table.
_CLAIM_NEXT = f"""
WITH RECURSIVE users AS (
    (SELECT "user" FROM escala_jobs WHERE state = 'queued' ORDER BY "user" LIMIT 1)
    UNION ALL
    SELECT (SELECT j."user" FROM escala_jobs j WHERE j.state = 'queued'
            AND j."user" > users."user" ORDER BY j."user" LIMIT 1)
    FROM users WHERE users."user" IS NOT NULL
), vt AS (
    SELECT users."user", coalesce(f.vtime, 0) AS vtime, coalesce(k.weight, 1.0) AS weight
    FROM users LEFT JOIN escala_fair f USING ("user") LEFT JOIN escala_api_keys k USING ("user")
    WHERE users."user" IS NOT NULL
), floor AS (
    SELECT coalesce(max(vtime), 0) - 1 AS v FROM vt
), ranked AS (
    SELECT vt."user", vt.weight, greatest(vt.vtime, floor.v) AS start, c.*
    FROM vt CROSS JOIN floor CROSS JOIN LATERAL (
        SELECT id, created_at, seq,
               row_number() OVER (ORDER BY priority DESC, created_at, seq) AS rank
        FROM (SELECT id, priority, created_at, seq FROM escala_jobs j
              WHERE j."user" = vt."user" AND j.state = 'queued'{{tasks}}
              ORDER BY priority DESC, created_at, seq LIMIT %(per_user)s) AS mine
    ) AS c
), fair AS (
    SELECT id, "user", start, weight,
           row_number() OVER (ORDER BY start + (rank - 1) / weight, created_at, seq) AS turn
    FROM ranked ORDER BY turn LIMIT %(per_user)s
), next AS (
    SELECT j.id, f.turn, f."user", f.start, f.weight
    FROM fair f JOIN escala_jobs j ON j.id = f.id
    WHERE j.state = 'queued' ORDER BY f.turn LIMIT %(n)s FOR UPDATE OF j SKIP LOCKED
), claimed AS (
    UPDATE escala_jobs j SET state = 'running', attempts = attempts + 1,
        started_at = {_NOW}, owner = %(owner)s, lease_until = {_NOW} + %(lease)s
    FROM next WHERE j.id = next.id
    RETURNING {job_columns("j")}, next.turn
), charged AS (
    -- vtime = max(vtime, floor) + k / weight, also when another claimer moved it meanwhile
    INSERT INTO escala_fair ("user", vtime, charged)
    SELECT "user", min(start) + count(*) / min(weight), count(*) / min(weight)
    FROM next GROUP BY "user" ORDER BY "user"
    ON CONFLICT ("user") DO UPDATE SET charged = EXCLUDED.charged,
        vtime = greatest(escala_fair.vtime + EXCLUDED.charged, EXCLUDED.vtime)
)
SELECT * FROM claimed
"""
_BACKLOG = (
    f'SELECT "user", task, count(*), {_NOW} - min(created_at) FROM escala_jobs '
    "WHERE state = 'queued' GROUP BY \"user\", task"
)
_NOTIFY = f"SELECT pg_notify('{CHANNEL}', m) FROM unnest(%s::text[]) AS m"
_HEARTBEAT = (
    f"UPDATE escala_jobs SET lease_until = {_NOW} + %s WHERE state = 'running' AND owner = %s"
)
_FINISH = (
    f"UPDATE escala_jobs SET state = %s, finished_at = {_NOW}, result = %s::jsonb, "
    "error = %s::jsonb, owner = NULL, lease_until = NULL "
    "WHERE id = %s AND state = 'running' AND owner = %s"
)
_CANCEL = (
    f"UPDATE escala_jobs SET state = 'cancelled', finished_at = {_NOW}, error = %s::jsonb, "
    """owner = NULL, lease_until = NULL WHERE id = %s AND "user" = %s """
    f"AND state IN ('queued', 'running') RETURNING {JOB_COLUMNS}"
)
_SELECT_OWN = f'SELECT {JOB_COLUMNS} FROM escala_jobs WHERE id = %s AND "user" = %s'
_REQUEUE = "UPDATE escala_jobs SET state = 'queued', owner = NULL, lease_until = NULL WHERE "
_RELEASE = _REQUEUE + "owner = %s AND id = ANY(%s) AND state = 'running'"
_RECOVER = (
    _REQUEUE + f"state = 'running' AND (lease_until < {_NOW} OR (%s AND owner IS DISTINCT FROM %s))"
)
_QUEUED = f"SELECT {JOB_COLUMNS} FROM escala_jobs WHERE state = 'queued' ORDER BY created_at, seq"
_COUNTS = "SELECT state, count(*) FROM escala_jobs GROUP BY state"
_ADD_KEY = f"INSERT INTO escala_api_keys ({KEY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)"
_REMOVE_KEY = 'DELETE FROM escala_api_keys WHERE "user" = %s'
_KEYS = f'SELECT {KEY_COLUMNS} FROM escala_api_keys ORDER BY "user"'


def _jsonb(value: Any, what: str) -> str:
    """Encode a JSON value for JSONB; ``TypeError`` naming the culprit if it is not one."""
    text = to_json(value, what)
    if "\\u0000" in text:  # JSONB refuses it; say so before anything is sent
        raise TypeError(f"{what} holds a NUL character (\\u0000), which PostgreSQL cannot store")
    return text


def _job(row: Sequence[Any]) -> Job:
    """Build a ``Job`` from a row of ``JOB_COLUMNS`` (JSONB arrives already decoded)."""
    return job_from_row(row)


def _where(url: str) -> str:
    """Say ``host:port`` (or the socket folder) of a connection string, for messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "?"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    return f"{host}:{params.get('port') or 5432}"


def _connect_error(url: str, exc: psycopg.Error) -> str:
    """Say why a connection failed, on one line, with a hint when nothing answered."""
    lines = [line.strip() for line in str(exc).splitlines()]
    # libpq's own hint ("Is the server running on that host…") would repeat ours
    why = " ".join(line for line in lines if line and not line.startswith("Is the server"))
    message = f"cannot connect to PostgreSQL at {_where(url)}: {why}"
    if exc.sqlstate is None:  # no answer from a server (refused, timed out, unknown host)
        message += "; is the server running?"
    return message


class PostgresStore:
    """A ``Store`` in a PostgreSQL database, which many escala nodes may share.

    Each method keeps the contract written on the ``Store`` protocol (``store/_types.py``).

    Args:
        url: A libpq connection string: ``postgresql://user:password@host:port/dbname``
            or ``"host=... dbname=..."``. The database must exist; ``open`` creates the
            tables.
        pool_size: The most connections this store opens at once.
    """

    #: Other servers may use the same database: never assume another owner is dead.
    exclusive = False
    #: The queue lives here, shared by every node (``escala.store.SharedStore``).
    shared = True

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        at_least_one("pool_size", pool_size)
        self.url = url
        self.pool_size = pool_size
        self._state = Lifecycle.NEW
        self._pool: AsyncConnectionPool | None = None

    @property
    def where(self) -> str:
        """Where the store is, for messages: ``PostgreSQL at host:port/dbname``, no password."""
        try:
            dbname = conninfo_to_dict(self.url).get("dbname") or "?"
        except psycopg.Error:
            dbname = "?"
        return f"PostgreSQL at {_where(self.url)}/{dbname}"

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create or migrate the schema, and open the connection pool.

        Raises:
            StoreError: The URL is malformed, the server cannot be reached or refuses us,
                the schema is newer than this escala, or the store was opened already.
        """
        if self._state is not Lifecycle.NEW:
            raise already_opened("PostgreSQL store")
        self._state = Lifecycle.OPEN
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def _open(self) -> None:
        try:
            params = conninfo_to_dict(self.url)
        except psycopg.Error as exc:
            why = str(exc).strip()
            raise StoreError(
                f"not a PostgreSQL URL ({why}); expected postgresql://user@host:port/dbname"
            ) from None
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = _CONNECT_TIMEOUT
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **kwargs)
        except psycopg.Error as exc:
            raise StoreError(_connect_error(self.url, exc)) from exc
        async with conn:
            await self._migrate(conn)
        pool: AsyncConnectionPool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs=kwargs,
            open=False,
            name="escala-store",
        )
        self._pool = pool
        try:
            await pool.open(wait=True, timeout=_CONNECT_TIMEOUT + 5)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL at {_where(self.url)}: {exc}") from exc

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Bring the schema to ``SCHEMA_VERSION``: all migrations or none, one node at a time."""
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                await conn.execute(_SCHEMA)
                row = await (await conn.execute("SELECT version FROM escala_schema")).fetchone()
                version = 0 if row is None else int(row[0])
                if version > SCHEMA_VERSION:
                    what = f"the PostgreSQL job store at {_where(self.url)}"
                    raise newer_schema(what, version, SCHEMA_VERSION)
                for statements in _MIGRATIONS[version:]:
                    for statement in statements:
                        await conn.execute(statement)
                if row is None:
                    await conn.execute(
                        "INSERT INTO escala_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
                    )
                elif version < SCHEMA_VERSION:
                    await conn.execute("UPDATE escala_schema SET version = %s", (SCHEMA_VERSION,))
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot prepare the job store at {_where(self.url)}: {str(exc).strip()}"
            ) from exc

    async def close(self) -> None:
        """Close every connection. Safe to call twice, and after a failed ``open``."""
        self._state = Lifecycle.CLOSED
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Borrow a connection (autocommit); turn database errors into ``StoreError``."""
        if self._state is not Lifecycle.OPEN or self._pool is None:
            raise not_open(self._state)
        try:
            async with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise database_error("PostgreSQL job store", exc) from exc

    async def _one(self, query: str, params: Sequence[Any]) -> Any:
        async with self._conn() as conn:
            return await (await conn.execute(query, params)).fetchone()

    async def _all(self, query: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
        async with self._conn() as conn:
            return await (await conn.execute(query, params)).fetchall()

    async def _rowcount(self, query: str, params: Sequence[Any]) -> int:
        async with self._conn() as conn:
            return (await conn.execute(query, params)).rowcount

    # -- jobs --------------------------------------------------------------------------

    async def submit(self, job: NewJob) -> tuple[Job, bool]:
        """Commit a new QUEUED job, or find the one its idempotency key created."""
        args, kwargs = encode_job(job, _jsonb)
        key = job.idempotency_key
        values = (uuid.uuid4().hex, job.user, job.task, args, kwargs, job.priority, key)
        async with self._conn() as conn:
            row = await (await conn.execute(_INSERT, values)).fetchone()
            if row is not None:
                return _job(row), True
            # The key's row is committed (ON CONFLICT waited for it), and rows are never
            # deleted: this statement's fresh snapshot finds it.
            found = await (await conn.execute(_SELECT_KEY, (job.user, key))).fetchone()
        if found is None:  # pragma: no cover - only if someone deletes rows by hand
            raise StoreError(f"job with idempotency key {key!r} vanished; try again")
        return _job(found), False

    async def get(self, job_id: str) -> Job | None:
        """Return the job with that id, or ``None`` when there is none."""
        row = await self._one(_GET, (job_id,))
        return None if row is None else _job(row)

    async def find(self, user: str, idempotency_key: str) -> Job | None:
        """Return the user's job made with that idempotency key, or ``None``."""
        row = await self._one(_SELECT_KEY, (user, idempotency_key))
        return None if row is None else _job(row)

    async def claim(self, job_ids: Sequence[str], owner: str, lease: float) -> list[Job]:
        """Move those of ``job_ids`` still QUEUED to RUNNING for ``owner``, in one statement."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return []
        claimed = {job.id: job for job in map(_job, await self._all(_CLAIM, (owner, lease, ids)))}
        return [claimed[i] for i in ids if i in claimed]

    async def claim_next(
        self, owner: str, n: int, lease: float, tasks: Collection[str] | None = None
    ) -> list[Job]:
        """Take up to ``n`` QUEUED jobs, fairest first, and mark them RUNNING for ``owner``.

        Fairest: the earliest start in virtual time (start-time fair queuing, each turn
        worth ``1 / the user's key weight``); within one user, higher priority first,
        then oldest. Safe against every other node doing the same at once: rows
        another claimer has locked are skipped, not waited for, so no job is claimed twice.

        Args:
            owner: Who will run them.
            n: The most jobs to take.
            lease: Seconds until the claim expires unless renewed by ``heartbeat``.
            tasks: Only jobs of these task names; ``None``: any task.

        Returns:
            The claimed jobs, in their turns.
        """
        if n < 1 or (tasks is not None and not tasks):
            return []
        params: dict[str, Any] = {"n": n, "owner": owner, "lease": lease, "per_user": 2 * n + 16}
        if tasks is None:
            query = _CLAIM_NEXT.format(tasks="")
        else:
            query = _CLAIM_NEXT.format(tasks=" AND task = ANY(%(tasks)s)")
            params["tasks"] = list(tasks)
        rows = await self._all(query, params)
        rows.sort(key=lambda row: row[-1])
        return [_job(row) for row in rows]

    async def backlog(self) -> list[Backlog]:
        """Return the queued jobs counted by user and task, with their longest wait."""
        return [Backlog(*row) for row in await self._all(_BACKLOG)]

    async def notify(self, messages: Sequence[str]) -> None:
        """Send each message (at most 8,000 bytes) to every listening node, in one commit."""
        if messages:
            await self._rowcount(_NOTIFY, (list(messages),))

    async def listen(self, on_message: Callable[[str], None]) -> None:
        """Call ``on_message`` with each message on the ``escala`` channel, until cancelled.

        Listens on a connection of its own (a pooled one would be handed to others).
        When that connection is lost it connects again, and calls ``on_message("")``:
        whatever was sent meanwhile is lost, and the caller should look for itself.
        """
        if self._state is not Lifecycle.OPEN:
            raise not_open(self._state)
        failures = 0
        # ends once the store is closed, even if a cancel is lost
        while self._state is Lifecycle.OPEN:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        log.warning("listening to %s again", _where(self.url))
                        on_message("")
                    failures = 0
                    async for note in conn.notifies():
                        on_message(note.payload)
            except psycopg.Error as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "lost the notifications of %s (%s); reconnecting",
                        _where(self.url),
                        str(exc).strip(),
                    )
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))

    async def heartbeat(self, owner: str, lease: float) -> int:
        """Extend to ``now + lease`` the lease of every RUNNING job of ``owner``; count them."""
        return await self._rowcount(_HEARTBEAT, (lease, owner))

    async def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        result: Any = None,
        error: Mapping[str, str] | None = None,
    ) -> bool:
        """Record the end of a RUNNING job held by ``owner``."""
        out, err = encode_outcome(job_id, state, result, error, _jsonb)
        return await self._rowcount(_FINISH, (state.value, out, err, job_id, owner)) == 1

    async def cancel(self, job_id: str, user: str) -> Job | None:
        """Cancel the user's job if it is QUEUED or RUNNING."""
        async with self._conn() as conn:
            row = await (await conn.execute(_CANCEL, (CANCELLED, job_id, user))).fetchone()
            if row is None:  # missing, another user's, or already final
                row = await (await conn.execute(_SELECT_OWN, (job_id, user))).fetchone()
        return None if row is None else _job(row)

    async def release(self, owner: str, job_ids: Sequence[str]) -> int:
        """Put RUNNING jobs of ``owner`` back to QUEUED, keeping their ``attempts``."""
        if not job_ids:
            return 0
        return await self._rowcount(_RELEASE, (owner, list(job_ids)))

    async def recover(self, owner: str, *, all_others: bool = False) -> int:
        """Put back to QUEUED every RUNNING job whose lease has expired (database clock)."""
        return await self._rowcount(_RECOVER, (all_others, owner))

    async def queued(self) -> list[Job]:
        """Return every QUEUED job, oldest first."""
        return [_job(row) for row in await self._all(_QUEUED)]

    async def counts(self) -> dict[JobState, int]:
        """Return how many jobs are in each state; every state is a key."""
        return count_states(await self._all(_COUNTS))

    # -- keys --------------------------------------------------------------------------

    async def add_key(self, key: ApiKey) -> None:
        """Store a key record."""
        try:
            await self._rowcount(_ADD_KEY, key_row(key))
        except StoreError as exc:
            if isinstance(exc.__cause__, pg_errors.UniqueViolation):
                raise key_taken(key.user) from None
            raise

    async def remove_key(self, user: str) -> bool:
        """Delete the user's key record; ``False`` when there was none."""
        return await self._rowcount(_REMOVE_KEY, (user,)) > 0

    async def keys(self) -> list[ApiKey]:
        """Return every key record, by user."""
        return [ApiKey(*row) for row in await self._all(_KEYS)]
