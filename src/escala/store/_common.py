"""What the SQLite and PostgreSQL stores write alike, written once.

Both keep a job as one row whose columns are ``Job``'s fields in their order, so that a
row read back is ``Job(*row)`` once its JSON and its state are decoded; both check a
job's arguments and a finish's result before anything is sent to the database, so that a
value the store cannot keep fails its caller alone; and both word their errors alike.
What differs (the SQL dialect, threads against a connection pool) stays in their modules.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ._types import ApiKey, Job, JobState, NewJob, StoreError

__all__ = [
    "CANCELLED",
    "JOB_COLUMNS",
    "JOB_FIELDS",
    "KEY_COLUMNS",
    "Encode",
    "Lifecycle",
    "already_opened",
    "at_least_one",
    "count_states",
    "database_error",
    "encode_job",
    "encode_outcome",
    "job_columns",
    "job_from_row",
    "key_row",
    "key_taken",
    "newer_schema",
    "not_open",
    "to_json",
]

#: How a store turns a value into JSON text: ``encode(value, what)``, ``what`` naming the
#: value in the ``TypeError`` it raises when the store cannot keep it.
Encode = Callable[[Any, str], str]


class Lifecycle(enum.Enum):
    """Where a store object is in its life; a store is opened once, never reopened."""

    NEW = "new"  # made; nothing connected yet, every method but ``open`` refuses
    OPEN = "open"  # ``open`` began (and, once it returns, succeeded): the methods work
    CLOSED = "closed"  # ``close`` ran, also after a failed ``open``: refuses, for good


#: A job's columns, in the order of ``Job``'s fields (a row of them is ``Job(*row)``).
JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
_STATE = JOB_FIELDS.index("state")
# The columns that hold JSON values: text in SQLite, JSONB (decoded by psycopg) in PostgreSQL.
_JSON = tuple(JOB_FIELDS.index(name) for name in ("args", "kwargs", "result", "error"))
#: An API key's columns, in the order of ``ApiKey``'s fields.
KEY_COLUMNS = ", ".join(f'"{f.name}"' for f in dataclasses.fields(ApiKey))
#: The error a cancelled job records, as JSON text.
CANCELLED = '{"type":"Cancelled","message":"cancelled by the user"}'


def job_columns(table: str = "") -> str:
    """Return the job columns for a SELECT or RETURNING list, qualified by ``table``.

    Every name is quoted: ``user`` is a reserved word in PostgreSQL, and quoting is
    harmless in both dialects.
    """
    prefix = f"{table}." if table else ""
    return ", ".join(f'{prefix}"{name}"' for name in JOB_FIELDS)


JOB_COLUMNS = job_columns()


def job_from_row(row: Sequence[Any], loads: Callable[[str], Any] | None = None) -> Job:
    """Build a ``Job`` from a row that starts with the ``JOB_FIELDS`` columns.

    Args:
        row: The columns, in ``JOB_FIELDS`` order; any after them are ignored.
        loads: Decodes the JSON columns when they arrive as text (SQLite); ``None`` when
            the driver has decoded them already (psycopg, for JSONB).

    Returns:
        The job.
    """
    values = list(row[: len(JOB_FIELDS)])
    if loads is not None:
        for i in _JSON:
            values[i] = None if values[i] is None else loads(values[i])
    values[_STATE] = JobState(values[_STATE])
    return Job(*values)


def key_row(key: ApiKey) -> tuple[Any, ...]:
    """Return a key record's values, in the order of ``KEY_COLUMNS``."""
    return dataclasses.astuple(key)


def count_states(rows: Iterable[tuple[str, int]]) -> dict[JobState, int]:
    """Turn ``(state, count)`` rows into a count for every state, zero for those absent."""
    found = {state: int(count) for state, count in rows}
    return {state: found.get(state.value, 0) for state in JobState}


# -- values checked before they are written ----------------------------------------------


def to_json(value: Any, what: str) -> str:
    """Encode a strict JSON value compactly.

    Args:
        value: Dicts, lists, strings, numbers, booleans and ``None`` (no NaN, no infinity).
        what: Names the value in the error ("args", "the result of job ...").

    Returns:
        The JSON text.

    Raises:
        TypeError: ``value`` is not a strict JSON value; the message names the culprit.
    """
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} is not a JSON value ({type(value).__name__}: {exc}); "
            "return or pass only dicts, lists, strings, numbers, booleans and None"
        ) from exc


def encode_job(job: NewJob, encode: Encode = to_json) -> tuple[str, str]:
    """Return a new job's ``args`` and ``kwargs`` as JSON text, before it is written.

    Raises:
        TypeError: Either is not a value the store can keep.
    """
    return encode(list(job.args), "args"), encode(dict(job.kwargs), "kwargs")


def encode_outcome(
    job_id: str,
    state: JobState,
    result: Any,
    error: Mapping[str, str] | None,
    encode: Encode = to_json,
) -> tuple[str | None, str | None]:
    """Check how a job finishes and return its result and error as JSON text (or ``None``).

    Checked before anything is written: a bad result must fail its caller alone.

    Raises:
        ValueError: ``state`` is neither SUCCEEDED nor FAILED.
        TypeError: The result or the error is not a value the store can keep.
    """
    if state not in (JobState.SUCCEEDED, JobState.FAILED):
        raise ValueError(f"a job finishes as succeeded or failed, not {state.value}")
    out = None if result is None else encode(result, f"the result of job {job_id}")
    err = None if error is None else encode(dict(error), "error")
    return out, err


def at_least_one(name: str, value: int) -> None:
    """Refuse a size option below one.

    Raises:
        ValueError: ``value`` is below 1; the message names the option.
    """
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")


# -- errors, worded alike ------------------------------------------------------------------


def not_open(state: Lifecycle) -> StoreError:
    """Say why a store that is not open refuses a call."""
    return StoreError("store is closed" if state is Lifecycle.CLOSED else "store is not open yet")


def already_opened(what: str) -> StoreError:
    """Say that ``what`` (a store) cannot be opened a second time."""
    return StoreError(f"{what} was already opened")


def newer_schema(what: str, version: int, known: int) -> StoreError:
    """Refuse a store whose schema a newer escala wrote: migrations only go forward."""
    return StoreError(
        f"{what} has schema version {version}, newer than this escala knows ({known}): "
        "upgrade escala to open it"
    )


def database_error(what: str, exc: Exception) -> StoreError:
    """Translate a database driver's error at the boundary, keeping it as the cause."""
    error = StoreError(f"{what}: {str(exc).strip()}")
    error.__cause__ = exc
    return error


def key_taken(user: str) -> StoreError:
    """Refuse a second key for ``user``: one key per user, replaced by removing it first."""
    return StoreError(f"user {user!r} already has a key; remove it first")
