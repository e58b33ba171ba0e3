"""The HTTP face of the service: a FastAPI app, versioned under ``/v1``.

Middleware, outermost first: admission control (an in-flight limit with a CoDel-timed
wait, 503 before any work) → the body-size limit (413) → FastAPI (auth, 422 for bad
bodies, the routes). Errors reach clients as ``{"detail": ...}`` and never carry a
traceback; the server's log has those.

The routes live in ``_routes`` as module-level routers, the bodies and answers in
``_schemas``; ``create_app`` only assembles them around one service.
"""

from __future__ import annotations

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
        The app, with the service in ``app.state.service`` and its admission gate in
        ``app.state.gate``.
    """
    gate = Gate(max_inflight=service.config.max_inflight, max_waiting=service.config.max_waiting)
    app = FastAPI(
        title="escala",
        version=__version__,
        summary="Durable jobs for many users: fair, admission-controlled, never blocking.",
        lifespan=service.lifespan if manage else None,
        default_response_class=AsciiJSON,
        responses={503: {"model": Problem, "description": "Overloaded; see Retry-After."}},
        exception_handlers=_ERROR_HANDLERS,
        middleware=_middleware(service, gate),
    )
    app.state.service = service
    app.state.gate = gate
    for router in ROUTERS:
        app.include_router(router)
    return app


def _middleware(service: Service, gate: Gate) -> list[Middleware]:
    """Return the app's middleware, outermost first."""
    stack = [Middleware(BodyLimit, limit=service.config.max_body)]
    if service.config.admission:
        admission = Middleware(
            AdmissionMiddleware,
            gate=gate,
            exempt=("/healthz", "/metrics"),
            unlimited=("/v1/jobs/",),
            on_refuse=service.metrics.rejected.labels("busy").inc,
        )
        stack.insert(0, admission)
    return stack


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
    """Answer 413 to a body larger than ``limit`` bytes, before the app reads any of it.

    Bodies are at most ``limit`` bytes, so buffering one here costs little and lets a
    chunked upload that grows too large be refused as cleanly as a declared one.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

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


async def _send_json(send: Send, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
