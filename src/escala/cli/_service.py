"""The service's commands: ``escala serve``, ``escala worker`` and ``escala keys``.

Kept apart from ``cli.py`` so that ``escala demo`` never imports FastAPI or uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import EscalaError
from ..store import ApiKey, StoreError, is_store_url, not_a_store_url, open_store
from ._common import UsageError
from ._common import positive_float as _positive_float

__all__ = ["add_commands"]


_STORE_HELP = "a PostgreSQL URL (postgresql://user@host/db) to share jobs between nodes"


def _running_options(parser: argparse.ArgumentParser) -> None:
    """The options of whatever runs jobs: ``serve`` and ``worker``."""
    parser.add_argument("--cpu-workers", type=int, help="processes (or Ray CPUs) for CPU tasks")
    parser.add_argument("--io-limit", type=int, default=256, help="I/O tasks at once")
    parser.add_argument(
        "--job-timeout", type=_positive_float, default=300.0, help="seconds per job"
    )
    parser.add_argument(
        "--lease",
        type=_positive_float,
        default=30.0,
        help="seconds before a dead node's running job is run elsewhere",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        help="runs a job gets when the node running it keeps stopping under it",
    )
    parser.add_argument(
        "--grace", type=_positive_float, default=10.0, help="seconds to finish on SIGTERM"
    )


def add_commands(commands: Any) -> None:
    """Add ``serve``, ``worker`` and ``keys`` to the ``escala`` parser's subcommands."""

    serve = commands.add_parser(
        "serve",
        help="run your @escala.task functions behind an HTTP job API",
        description="Serve the tasks of an app module over HTTP: durable jobs in SQLite, "
        "I/O tasks on the event loop, CPU tasks in one process pool, admission control, "
        "fair shares between users, API keys, /metrics and a live dashboard at /.",
    )
    serve.add_argument("--app", required=True, metavar="MODULE", help="module with the tasks")
    serve.add_argument("--db", type=Path, default=Path("escala.db"), help="the SQLite file")
    serve.add_argument("--store", metavar="URL", help=_STORE_HELP)
    serve.add_argument(
        "--executor",
        default="local",
        metavar="WHERE",
        help="where jobs run: local (default), none (escala worker runs them), "
        "ray or ray://HOST:PORT (CPU tasks on a Ray cluster)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    serve.add_argument(
        "--no-auth", action="store_true", help="no API keys: loopback only, for trying it out"
    )
    _running_options(serve)
    serve.add_argument("--max-queued", type=int, default=200_000, help="waiting jobs in all")
    serve.add_argument(
        "--max-queued-per-user", type=int, default=100_000, help="waiting jobs per user"
    )
    serve.add_argument(
        "--max-queue-wait", type=_positive_float, default=30.0, help="seconds before 503s start"
    )
    serve.add_argument(
        "--rate", type=_positive_float, help="default jobs/s per user (token bucket)"
    )
    serve.add_argument("--burst", type=int, help="default bucket size per user")
    serve.add_argument("--max-inflight", type=int, default=256, help="HTTP requests at once")
    serve.add_argument(
        "--max-reads",
        type=int,
        default=16,
        help="reads of job state (GET, DELETE /v1/jobs/ID) at once, beside --max-inflight",
    )
    serve.add_argument(
        "--max-streams",
        type=int,
        default=10_000,
        help="long-polls (/wait) and event streams (/events) open at once (503 beyond)",
    )
    serve.add_argument(
        "--max-streams-per-user",
        type=int,
        default=1_000,
        help="long-polls and event streams one user may have open (429 beyond)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections; beyond, the longest idle one is closed, or a new one gets "
        "503 (default: what the descriptor limit, raised to its hard limit, leaves after "
        "the files open at start and a reserve of an eighth)",
    )
    serve.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="time a connection gets to send a whole request head (default: %(default)g)",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="time a request gets to send its whole body; 408 beyond (default: %(default)g)",
    )
    serve.add_argument(
        "--keep-alive",
        type=int,
        default=30,
        metavar="SECONDS",
        help="time an idle connection is kept open between requests (default: %(default)s)",
    )
    serve.add_argument(
        "--no-admission",
        action="store_true",
        help="turn admission control off (to see what it buys; not for production)",
    )
    serve.set_defaults(run=_serve)

    worker = commands.add_parser(
        "worker",
        help="run the jobs of a shared PostgreSQL store, on any machine",
        description="Take jobs that escala serve accepted from the PostgreSQL store they "
        "share, fairest first, and run them: I/O tasks on the event loop and threads, CPU "
        "tasks in a process pool (or on Ray). Run as many as you like, on as many "
        "machines; a worker that dies loses its jobs only until their lease expires.",
    )
    worker.add_argument("--app", required=True, metavar="MODULE", help="module with the tasks")
    worker.add_argument("--store", required=True, metavar="URL", help=_STORE_HELP)
    worker.add_argument(
        "--executor",
        default="local",
        metavar="WHERE",
        help="local (default), or ray / ray://HOST:PORT for CPU tasks on a Ray cluster",
    )
    _running_options(worker)
    worker.set_defaults(run=_worker)

    keys = commands.add_parser(
        "keys",
        help="manage the API keys of escala serve",
        description="Add, list or remove API keys. A key is shown once, when it is made; "
        "the database keeps only its hash.",
    )
    keys.add_argument("--db", type=Path, default=Path("escala.db"), help="the SQLite file")
    keys.add_argument("--store", metavar="URL", help=_STORE_HELP)
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="make a key for a user and print it once")
    add.add_argument("user", help="the user's name")
    add.add_argument(
        "--weight", type=_positive_float, default=1.0, help="fair share against others"
    )
    add.add_argument("--rate", type=_positive_float, help="jobs per second allowed")
    add.add_argument("--burst", type=int, help="jobs allowed at once above the rate")
    add.set_defaults(run=_keys_add)
    listing = actions.add_parser("list", help="list users with keys")
    listing.set_defaults(run=_keys_list)
    remove = actions.add_parser("remove", help="remove a user's key")
    remove.add_argument("user", help="the user's name")
    remove.set_defaults(run=_keys_remove)


def _serve(args: argparse.Namespace) -> int:
    return _run(args, "serve")


def _worker(args: argparse.Namespace) -> int:
    return _run(args, "worker")


def _run(args: argparse.Namespace, command: str) -> int:
    try:
        # the serve extra (FastAPI, uvicorn) is imported only by the commands that serve
        from ..service import AppError, ConfigError, ServiceConfig, load_app, serve, work
    except ImportError as exc:
        raise UsageError(
            f"escala {command} needs its extra ({exc.name} is missing): pip install 'escala[serve]'"
        ) from None

    # the app module is the user's, found from the folder they run escala in
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    settings: dict[str, Any] = {
        "app": args.app,
        "store": args.store,
        "executor": args.executor,
        "cpu_workers": args.cpu_workers,
        "io_limit": args.io_limit,
        "job_timeout": args.job_timeout,
        "lease": args.lease,
        "grace": args.grace,
        "max_attempts": args.max_attempts,
    }
    if command == "serve":
        settings |= {
            "db": args.db,
            "host": args.host,
            "port": args.port,
            "auth": not args.no_auth,
            "max_queued": args.max_queued,
            "max_queued_per_user": args.max_queued_per_user,
            "max_queue_wait": args.max_queue_wait,
            "rate": args.rate,
            "burst": args.burst,
            "max_inflight": args.max_inflight,
            "max_reads": args.max_reads,
            "max_streams": args.max_streams,
            "max_streams_per_user": args.max_streams_per_user,
            "max_connections": args.max_connections,
            "header_timeout": args.header_timeout,
            "body_timeout": args.body_timeout,
            "keep_alive": args.keep_alive,
            "admission": not args.no_admission,
        }
    try:
        config = ServiceConfig(**settings)
        tasks = load_app(args.app)
        (serve if command == "serve" else work)(config, tasks)
    except ConfigError as exc:
        # the settings are named as fields; on the command line they are flags
        field, _, rest = str(exc).partition(" ")
        flag = "--" + field.replace("_", "-") if field.isidentifier() else field
        raise UsageError(f"{flag} {rest}") from None
    except (AppError, StoreError, EscalaError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0


def _keys_store(args: argparse.Namespace) -> Any:
    """The store that ``escala keys`` works on: ``--store``'s URL, else ``--db``'s file."""

    if args.store is not None and not is_store_url(args.store):
        raise UsageError(f"--store {not_a_store_url(args.store)}")
    try:
        # not exclusive: keys may be managed while a server runs on the same file
        return open_store(args.store or args.db, exclusive=False)
    except StoreError as exc:
        raise UsageError(str(exc)) from None


def _shown(store: Any) -> str:
    return str(getattr(store, "where", None) or getattr(store, "path", "the store"))


async def _with_store(store: Any, action: Callable[[Any], Any]) -> Any:

    try:
        await store.open()
        return await action(store)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    finally:
        await store.close()


def _keys_add(args: argparse.Namespace) -> int:
    # escala.service needs the serve extra (FastAPI): only commands that serve import it
    from ..service._auth import hash_key, new_key

    if args.weight <= 0:
        raise UsageError(f"--weight must be positive, got {args.weight:g}")
    if args.burst is not None and args.burst < 1:
        raise UsageError(f"--burst must be at least 1, got {args.burst}")
    key = new_key()
    record = ApiKey(args.user, hash_key(key), args.weight, args.rate, args.burst, time.time())
    store = _keys_store(args)
    asyncio.run(_with_store(store, lambda store: store.add_key(record)))
    print(key)
    print(
        f"key for {args.user!r} stored (hashed) in {_shown(store)}; it is shown only now. "
        "Send it as `Authorization: Bearer <key>`.",
        file=sys.stderr,
    )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    store = _keys_store(args)
    records = asyncio.run(_with_store(store, lambda store: store.keys()))
    if not records:
        print(f"no keys in {_shown(store)}; add one with `escala keys add NAME`", file=sys.stderr)
    for r in records:
        limit = f"{r.rate:g}/s" if r.rate is not None else "no rate limit"
        print(f"{r.user}\tweight {r.weight:g}\t{limit}")
    return 0


def _keys_remove(args: argparse.Namespace) -> int:
    store = _keys_store(args)
    removed = asyncio.run(_with_store(store, lambda store: store.remove_key(args.user)))
    if not removed:
        raise UsageError(f"{args.user!r} has no key in {_shown(store)}")
    print(f"key of {args.user!r} removed", file=sys.stderr)
    return 0
