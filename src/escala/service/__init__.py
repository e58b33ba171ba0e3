"""``escala serve``: registered tasks behind an HTTP API, for many users at once.

The map of this package, from the outside in::

    _server   uvicorn, signals, the listening socket, the descriptor limit
    _connections  the connection cap, header and idle timeouts (uvicorn's h11, guarded)
    _loop     the event loop: no NaN timers, terse "too many open files"
    _worker   `escala worker`: the same Service without HTTP, on a shared store
    _app      the FastAPI app: body limit, admission middleware, error handlers
    _routes   the routers (jobs, run, operations, pages) and auth (HTTP in, JSON out)
    _schemas  the bodies and answers, and the ASCII-only JSON they travel in
    _core     Service: admission, fair queues, dispatch to escala pools, leases, events
    _executor the pools jobs run on, their slots, and tasks given up on that still run
    _events   long-polls and event streams: who watches what, capped per user and in all
    _shared   the queue when it lives in a store many nodes share (PostgreSQL)
    _admission  in-flight gate with CoDel timeouts, token buckets, queue-wait deadline
    _fair     weighted deficit round robin across users
    _types    Refused, RunResult, JobProgress (report_progress), Lifecycle, error shapes
    _auth     API keys (hashed), _metrics (Prometheus, loop lag), _registry (tasks)
    ../store  where jobs live: SQLite by default, PostgreSQL for many nodes

The service is a client of escala's public engine (``escala.Pool``), like any user.
Mount it in an existing app with ``create_app(service, manage=False)`` and run
``service.lifespan`` in the host app's lifespan.
"""

from __future__ import annotations

from ._app import create_app as create_app
from ._config import ConfigError as ConfigError
from ._config import ServiceConfig as ServiceConfig
from ._core import Service as Service
from ._registry import AppError as AppError
from ._registry import load_app as load_app
from ._server import serve as serve
from ._types import Refused as Refused
from ._types import report_progress as report_progress
from ._worker import work as work

__all__ = [
    "AppError",
    "ConfigError",
    "Refused",
    "Service",
    "ServiceConfig",
    "create_app",
    "load_app",
    "serve",
    "work",
]
