"""The service's commands: ``escala serve`` and ``escala keys add | list | remove``.

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

from ._cli_common import UsageError
from ._cli_common import positive_float as _positive_float

__all__ = ["add_commands"]


def add_commands(commands: Any) -> None:
    """Add ``serve`` and ``keys`` to the ``escala`` parser's subcommands."""

    serve = commands.add_parser(
        "serve",
        help="run your @escala.task functions behind an HTTP job API",
        description="Serve the tasks of an app module over HTTP: durable jobs in SQLite, "
        "I/O tasks on the event loop, CPU tasks in one process pool, admission control, "
        "fair shares between users, API keys, /metrics and a live dashboard at /.",
    )
    serve.add_argument("--app", required=True, metavar="MODULE", help="module with the tasks")
    serve.add_argument("--db", type=Path, default=Path("escala.db"), help="the SQLite file")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    serve.add_argument(
        "--no-auth", action="store_true", help="no API keys: loopback only, for trying it out"
    )
    serve.add_argument("--cpu-workers", type=int, help="processes for CPU tasks")
    serve.add_argument("--io-limit", type=int, default=256, help="I/O tasks at once")
    serve.add_argument("--job-timeout", type=_positive_float, default=300.0, help="seconds per job")
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
        "--max-attempts",
        type=int,
        default=5,
        help="runs a job gets when the server keeps stopping under it",
    )
    serve.add_argument(
        "--no-admission",
        action="store_true",
        help="turn admission control off (to see what it buys; not for production)",
    )
    serve.add_argument(
        "--grace", type=_positive_float, default=10.0, help="seconds to finish on SIGTERM"
    )
    serve.set_defaults(run=_serve)

    keys = commands.add_parser(
        "keys",
        help="manage the API keys of escala serve",
        description="Add, list or remove API keys. A key is shown once, when it is made; "
        "the database keeps only its hash.",
    )
    keys.add_argument("--db", type=Path, default=Path("escala.db"), help="the SQLite file")
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
    try:
        from .service import AppError, ConfigError, ServiceConfig, load_app, serve
    except ImportError as exc:
        raise UsageError(
            f"escala serve needs its extra ({exc.name} is missing): pip install 'escala[serve]'"
        ) from None
    from .store import StoreError

    # the app module is the user's, found from the folder they run escala in
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        config = ServiceConfig(
            app=args.app,
            db=args.db,
            host=args.host,
            port=args.port,
            auth=not args.no_auth,
            cpu_workers=args.cpu_workers,
            io_limit=args.io_limit,
            job_timeout=args.job_timeout,
            max_queued=args.max_queued,
            max_queued_per_user=args.max_queued_per_user,
            max_queue_wait=args.max_queue_wait,
            rate=args.rate,
            burst=args.burst,
            max_inflight=args.max_inflight,
            grace=args.grace,
            admission=not args.no_admission,
            max_attempts=args.max_attempts,
        )
        tasks = load_app(args.app)
        serve(config, tasks)
    except ConfigError as exc:
        # the settings are named as fields; on the command line they are flags
        field, _, rest = str(exc).partition(" ")
        flag = "--" + field.replace("_", "-") if field.isidentifier() else field
        raise UsageError(f"{flag} {rest}") from None
    except (AppError, StoreError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0


def _open_store(path: Path) -> Any:
    from .store.sqlite import SQLiteStore

    # not exclusive: keys may be managed while a server runs on the same file
    return SQLiteStore(path, exclusive=False)


async def _with_store(path: Path, action: Callable[[Any], Any]) -> Any:
    from .store import StoreError

    store = _open_store(path)
    try:
        await store.open()
        return await action(store)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    finally:
        await store.close()


def _keys_add(args: argparse.Namespace) -> int:
    from .service._auth import hash_key, new_key
    from .store import ApiKey

    if args.weight <= 0:
        raise UsageError(f"--weight must be positive, got {args.weight:g}")
    if args.burst is not None and args.burst < 1:
        raise UsageError(f"--burst must be at least 1, got {args.burst}")
    key = new_key()
    record = ApiKey(args.user, hash_key(key), args.weight, args.rate, args.burst, time.time())
    asyncio.run(_with_store(args.db, lambda store: store.add_key(record)))
    print(key)
    print(
        f"key for {args.user!r} stored (hashed) in {args.db}; it is shown only now. "
        "Send it as `Authorization: Bearer <key>`.",
        file=sys.stderr,
    )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    records = asyncio.run(_with_store(args.db, lambda store: store.keys()))
    if not records:
        print(f"no keys in {args.db}; add one with `escala keys add NAME`", file=sys.stderr)
    for r in records:
        limit = f"{r.rate:g}/s" if r.rate is not None else "no rate limit"
        print(f"{r.user}\tweight {r.weight:g}\t{limit}")
    return 0


def _keys_remove(args: argparse.Namespace) -> int:
    removed = asyncio.run(_with_store(args.db, lambda store: store.remove_key(args.user)))
    if not removed:
        raise UsageError(f"{args.user!r} has no key in {args.db}")
    print(f"key of {args.user!r} removed", file=sys.stderr)
    return 0
