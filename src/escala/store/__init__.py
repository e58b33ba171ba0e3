"""Job stores: where the service keeps jobs and API keys, behind one protocol.

A store is the service's only durable state. The default is :mod:`escala.store.sqlite`
(one file, WAL, group commit); a PostgreSQL store implements the same protocol so that
many nodes can share one queue. ``open_store`` picks the store a URL or path names and
imports its module on first use, so that PostgreSQL is only needed by those who use it.

The package, bottom up::

    _types.py    the Store and SharedStore protocols, Job, JobState, ApiKey, StoreError
    _common.py   what both stores write alike: rows <-> jobs, JSON checks, messages
    sqlite.py    SQLiteStore, the default (imports _types and _common, never this file)
    postgres.py  PostgresStore, for many nodes (escala[postgres]; the same imports)
    __init__.py  this public face: the re-exports and the lazy registry ``open_store``
"""

from __future__ import annotations

from pathlib import Path

from ._types import ApiKey as ApiKey
from ._types import Backlog as Backlog
from ._types import Job as Job
from ._types import JobState as JobState
from ._types import NewJob as NewJob
from ._types import SharedStore as SharedStore
from ._types import Store as Store
from ._types import StoreError as StoreError
from ._types import is_shared as is_shared

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
    "is_store_url",
    "not_a_store_url",
    "open_store",
]


def is_store_url(where: str) -> bool:
    """Return whether ``where`` is a PostgreSQL connection URL rather than a file path."""
    return where.startswith(("postgresql://", "postgres://"))


def not_a_store_url(where: str) -> str:
    """Say what a store URL must look like, for an error about ``where``."""
    return (
        f"must be a PostgreSQL URL such as postgresql://user@host:5432/dbname, got {where!r} "
        "(a SQLite file is given with --db)"
    )


def open_store(where: str | Path, *, exclusive: bool = True) -> Store:
    """Return the store ``where`` names: a PostgreSQL URL, else the path of a SQLite file.

    ``exclusive`` applies to SQLite only (one server per file). Nothing is opened yet.

    Args:
        where: A ``postgresql://`` or ``postgres://`` URL, or the path of a SQLite file.
        exclusive: Lock the SQLite file against other servers; ``False`` is for tools
            that only manage keys beside a running server.

    Returns:
        The store, not yet opened.

    Raises:
        StoreError: a PostgreSQL URL without the ``postgres`` extra installed.
    """
    # The imports are the registry: each store's module (and its database driver) is
    # loaded only when a store of that kind is asked for.
    if isinstance(where, str) and is_store_url(where):
        try:
            from .postgres import PostgresStore
        except ImportError as exc:  # says "pip install 'escala[postgres]'"
            raise StoreError(str(exc)) from None
        return PostgresStore(where)
    from .sqlite import SQLiteStore

    return SQLiteStore(where, exclusive=exclusive)
