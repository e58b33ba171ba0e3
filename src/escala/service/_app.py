"""The HTTP face of the service: a FastAPI app, versioned under ``/v1``.

Middleware, outermost first: admission control (an in-flight limit with a CoDel-timed
wait, 503 before any work; reads of a job's state have a limit of their own, and
long-polls and event streams are bounded by ``Watchers`` instead) → the body limits
(413 when too large, 408 when too slow) → FastAPI (auth, 422 for bad bodies, the
routes). ``/healthz`` and ``/metrics`` wait behind no limit. Errors reach clients as
``{"detail": ...}`` and never carry a traceback; the server's log has those.

The routes live in ``_routes`` as module-level routers, the bodies and answers in
``_schemas``; ``create_app`` only assembles them around one service.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..store import StoreError
from ._admission import AdmissionMiddleware, Gate
from ._core import Service
from ._routes import ROUTERS
from ._schemas import AsciiJSON, Problem
from ._types import Refused

__all__ = ["create_app"]

log = logging.getLogger("escala.service")


def create_app(service: Service, *, manage: bool = True) -> FastAPI:
    """Build the ASGI app of a service.

    Args:
        service: the service to put behind HTTP.
        manage: start and stop the service with the app's lifespan. Pass ``False`` when
            the app is mounted inside another one (whose lifespan must then run
            ``service.lifespan``), since mounted apps get no lifespan events.

    Returns:
        The app, with the service in ``app.state.service``, its admission gate in
        ``app.state.gate`` and the gate of job-state reads in ``app.state.reads``.
    """
    config = service.config
    gate = Gate(max_inflight=config.max_inflight, max_waiting=config.max_waiting)
    # Reads wait for a slot up to a second, not CoDel's 5 ms: pollers retry at once, and
    # a refusal costs the loop as much as an answer, so refusing them fast only turns
    # 300 polling clients into tens of thousands of 503s a second that fill the loop
    # (measured: /healthz at 120-240 ms); parked, a waiting request costs nothing.
    reads = Gate(
        max_inflight=config.max_reads, max_waiting=config.max_waiting, target=1.0, interval=1.0
    )
    app = FastAPI(
        title="escala",
        version=__version__,
        summary="Durable jobs for many users: fair, admission-controlled, never blocking.",
        lifespan=service.lifespan if manage else None,
        default_response_class=AsciiJSON,
        responses={503: {"model": Problem, "description": "Overloaded; see Retry-After."}},
        exception_handlers=_ERROR_HANDLERS,
        middleware=_middleware(service, gate, reads),
    )
    app.state.service = service
    app.state.gate = gate
    app.state.reads = reads
    for router in ROUTERS:
        app.include_router(router)
    return app


def _middleware(service: Service, gate: Gate, reads: Gate) -> list[Middleware]:
    """Return the app's middleware, outermost first."""
    config = service.config
    stack = [Middleware(BodyLimit, limit=config.max_body, timeout=config.body_timeout)]
    if config.admission:
        admission = Middleware(
            AdmissionMiddleware,
            gate=gate,
            exempt=("/healthz", "/metrics"),
            lanes=[(_is_stream, None), (_is_job, reads)],
            on_refuse=service.metrics.rejected.labels("busy").inc,
        )
        stack.insert(0, admission)
    return stack


def _is_stream(path: str) -> bool:
    # a long-poll or an event stream holds its request for up to an hour: it would hold
    # a gate's slot as long, so Watchers bounds these (per user and in all) instead
    return path.startswith("/v1/jobs/") and path.endswith(("/wait", "/events"))


def _is_job(path: str) -> bool:
    return path.startswith("/v1/jobs/")


# -- errors ---------------------------------------------------------------------------------


async def _refused(request: Request, exc: Refused) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return AsciiJSON({"detail": exc.detail}, exc.status, headers=headers)


async def _store_down(request: Request, exc: StoreError) -> Response:
    # the database is down or gone (a PostgreSQL restart, a full disk): nothing was
    # accepted, and the client should come back; the cause is for the operator's log
    log.error("the job store failed during %s %s: %s", request.method, request.url.path, exc)
    detail = (
        "the job store is unavailable; retry later (with the same idempotency key, a "
        "retry cannot make a second job)"
    )
    return AsciiJSON({"detail": detail}, 503, headers={"Retry-After": "5"})


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return AsciiJSON({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    kind = request.headers.get("content-type", "")
    if request.method == "POST" and "json" not in kind:
        # curl -d sends form encoding: say what to send rather than what pydantic saw
        detail = (
            f"the body must be JSON, sent with `Content-Type: application/json` "
            f"(this request said {kind or 'nothing'!r})"
        )
        return AsciiJSON({"detail": detail}, 422)
    errors = jsonable_encoder(exc.errors())
    for error in errors:
        try:
            json.dumps(error.get("input"), allow_nan=False)
        except ValueError:  # NaN or infinity: echo it as text, strict JSON has none
            error["input"] = repr(error["input"])
    return AsciiJSON({"detail": errors}, 422)


# FastAPI's own handlers of its errors answer with plain JSONResponse: replaced, so that
# what a client sent can always be echoed back (see AsciiJSON).
_Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
_ERROR_HANDLERS: dict[int | type[Exception], _Handler] = {
    Refused: _refused,
    StoreError: _store_down,
    StarletteHTTPException: _http_error,
    RequestValidationError: _invalid,
}


# -- middleware -----------------------------------------------------------------------------


class BodyLimit:
    """Answer 413 to a body larger than ``limit`` bytes, before the app reads any of it,
    and 408 to one that takes over ``timeout`` seconds to arrive.

    Bodies are at most ``limit`` bytes, so buffering one here costs little and lets a
    chunked upload that grows too large be refused as cleanly as a declared one. The
    timeout is for the whole body, not between two reads: a client sending a byte a
    second would pass any gap limit while it holds an admission slot.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    size += len(message.get("body", b""))
                    if size > self.limit:
                        await self._refuse(send)
                        return
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            # the rest of the body may still come: the connection cannot be read on
            detail = {"detail": f"the request body did not arrive within {self.timeout:g} s"}
            await _send_json(send, 408, detail, close=True)
            return
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        detail = {"detail": f"the request body is larger than {self.limit} bytes"}
        await _send_json(send, 413, detail)


async def _send_json(send: Send, status: int, body: Any, *, close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
