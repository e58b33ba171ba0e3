"""The HTTP face of the service: a FastAPI app, versioned under ``/v1``.

Middleware, outermost first: admission control (an in-flight limit with a CoDel-timed
wait, 503 before any work) → the body-size limit (413) → FastAPI (auth, 422 for bad
bodies, the routes). Errors reach clients as ``{"detail": ...}`` and never carry a
traceback; the server's log has those.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..store import Job, JobState, NewJob, StoreError
from ._admission import AdmissionMiddleware, Gate
from ._config import is_loopback
from ._core import Service
from ._types import Lifecycle, Progress, Refused, RunResult

__all__ = ["create_app"]

log = logging.getLogger("escala.service")
LOCAL_USER = "local"
JobId = Annotated[str, Path(max_length=64, description="The id the job was given at submission.")]


# -- bodies ---------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """Refuse NaN and infinities anywhere in a JSON value.

    Python's JSON parser reads ``NaN``, ``Infinity`` and ``1e400`` (as inf), which strict
    JSON lacks: they could be neither stored nor sent back to a client.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite: JSON has no NaN or Infinity")
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return value


class _Arguments(BaseModel):
    """A task's arguments: JSON values only."""

    model_config = ConfigDict(extra="forbid")
    args: list[JsonValue] = Field(default_factory=list, max_length=10_000)
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)

    _check_finite = field_validator("args", "kwargs")(_finite)


class JobIn(_Arguments):
    """A job to run later."""

    task: str = Field(min_length=1, max_length=200, description="A task of GET /v1/tasks.")
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The same key from the same user gives back the same job.",
    )
    priority: int = Field(default=0, ge=-1000, le=1000, description="Higher runs first.")


class RunIn(_Arguments):
    """Arguments of a task run in the request."""


class ErrorOut(BaseModel):
    """Why a job failed: the exception's type and message, never its traceback."""

    type: str
    message: str


class JobOut(BaseModel):
    """A job as its user sees it."""

    id: str
    task: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    attempts: int
    priority: int
    idempotency_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: JsonValue = None
    error: ErrorOut | None = None


class RunOut(BaseModel):
    """The outcome of a task run in the request."""

    state: Literal["succeeded", "failed"]
    result: JsonValue = None
    error: ErrorOut | None = None
    duration_ms: float


class TaskOut(BaseModel):
    """A task the service offers."""

    name: str
    pool: Literal["cpu", "io"]
    is_async: bool
    parameters: list[str]
    doc: str


class Problem(BaseModel):
    """What went wrong, in words."""

    detail: str


def _when(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def job_out(job: Job) -> JobOut:
    """Show a stored job to its user."""
    return JobOut(
        id=job.id,
        task=job.task,
        state=job.state.value,
        attempts=job.attempts,
        priority=job.priority,
        idempotency_key=job.idempotency_key,
        created_at=datetime.fromtimestamp(job.created_at, UTC),
        started_at=_when(job.started_at),
        finished_at=_when(job.finished_at),
        result=job.result,
        error=ErrorOut(**job.error) if job.error else None,
    )


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped.

    JSON's ``\\u`` escapes can spell lone surrogates, which UTF-8 cannot encode: echoed
    back in an error or a result, they would make the answer itself fail. Escaped, any
    string a client sent can be sent back.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


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


# -- the app --------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key made with `escala keys add`.")
_REFUSALS: dict[int | str, dict[str, Any]] = {
    429: {"model": Problem, "description": "Over this user's rate or queue limit."},
    503: {"model": Problem, "description": "Overloaded or shutting down; see Retry-After."},
}
_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "A valid API key is needed."}
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such job for this user."}
}
_BAD_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body cannot be parsed (not UTF-8 JSON)."},
    413: {"model": Problem, "description": "The body is larger than the server's limit."},
}
# Bodies the schema refuses get FastAPI's list of errors; arguments that do not fit the
# task's signature (known only at run time), a Problem.
_UNFIT: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "The body is invalid, or the arguments do not fit the task.",
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/HTTPValidationError"},
                        {"$ref": "#/components/schemas/Problem"},
                    ]
                }
            }
        },
    }
}


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Return who is asking, from their API key (or ``local`` without keys)."""
    service: Service = request.app.state.service
    if not service.config.auth:
        return LOCAL_USER
    if credentials is not None:
        record = await service.auth.check(credentials.credentials)
        if record is not None:
            return record.user
    raise HTTPException(
        401,
        "a valid API key is needed: send `Authorization: Bearer <key>`",
        headers={"WWW-Authenticate": "Bearer"},
    )


User = Annotated[str, Depends(current_user)]


def create_app(service: Service, *, manage: bool = True) -> FastAPI:
    """Build the ASGI app of a service.

    Args:
        service: the service to put behind HTTP.
        manage: start and stop the service with the app's lifespan. Pass ``False`` when
            the app is mounted inside another one (whose lifespan must then run
            ``service.lifespan``), since mounted apps get no lifespan events.
    """
    app = FastAPI(
        title="escala",
        version=__version__,
        summary="Durable jobs for many users: fair, admission-controlled, never blocking.",
        lifespan=service.lifespan if manage else None,
        default_response_class=AsciiJSON,
        responses={503: {"model": Problem, "description": "Overloaded; see Retry-After."}},
    )
    app.state.service = service

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return AsciiJSON({"detail": exc.detail}, exc.status, headers=headers)

    @app.exception_handler(StoreError)
    async def store_down(request: Request, exc: StoreError) -> Response:
        # the database is down or gone (a PostgreSQL restart, a full disk): nothing was
        # accepted, and the client should come back; the cause is for the operator's log
        log.error("the job store failed during %s %s: %s", request.method, request.url.path, exc)
        detail = (
            "the job store is unavailable; retry later (with the same idempotency key, a "
            "retry cannot make a second job)"
        )
        return AsciiJSON({"detail": detail}, 503, headers={"Retry-After": "5"})

    # FastAPI's own handlers answer with plain JSONResponse: replaced, so that what a
    # client sent can always be echoed back (see AsciiJSON)
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return AsciiJSON({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
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

    def task_of(name: str) -> None:
        if name not in service.tasks:
            raise HTTPException(404, f"no task named {name!r}; GET /v1/tasks lists them")

    def arguments_fit(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        try:
            service.tasks[name].check_arguments(args, kwargs)
        except TypeError as exc:
            raise HTTPException(422, f"the arguments do not fit task {name!r}: {exc}") from None

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobOut,
        responses={
            **_AUTH,
            **_REFUSALS,
            **_BAD_BODY,
            **_UNFIT,
            404: {"model": Problem, "description": "No such task."},
            409: {"model": Problem, "description": "The idempotency key named another job."},
        },
    )
    async def submit(body: JobIn, user: User, response: Response) -> JobOut:
        """Queue a job; answered only once the job is durably stored."""
        task_of(body.task)
        arguments_fit(body.task, body.args, body.kwargs)
        new = NewJob(user, body.task, body.args, body.kwargs, body.priority, body.idempotency_key)
        job, created = await service.submit(new)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return job_out(job)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses={**_AUTH, **_NOT_FOUND})
    async def get_job(job_id: JobId, user: User) -> JobOut:
        """Show a job: its state, and its result or error once it has ended."""
        job = await service.get(user, job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job_out(job)

    @app.get(
        "/v1/jobs/{job_id}/wait",
        response_model=JobOut,
        responses={**_AUTH, **_NOT_FOUND, **_REFUSALS},
    )
    async def wait_job(
        job_id: JobId,
        user: User,
        timeout: Annotated[float, Query(ge=0, le=60, description="Seconds to wait at most.")] = 30,
    ) -> JobOut:
        """Wait until the job ends or ``timeout`` passes, then show it (long-poll)."""
        last = None
        async for change in service.watch(user, job_id, timeout):
            if isinstance(change, Job):
                last = change
        if last is None:
            raise HTTPException(404, "no such job")
        return job_out(last)

    @app.get(
        "/v1/jobs/{job_id}/events",
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."},
            **_AUTH,
            **_NOT_FOUND,
            **_REFUSALS,
        },
        response_class=StreamingResponse,
    )
    async def job_events(
        job_id: JobId,
        user: User,
        timeout: Annotated[float, Query(ge=0, le=3600, description="Seconds to stream.")] = 300,
    ) -> StreamingResponse:
        """Stream the job as server-sent events until it ends: an event named after each
        state it enters (data: the job), and ``progress`` events its task reports."""
        if await service.get(user, job_id) is None:
            raise HTTPException(404, "no such job")
        return StreamingResponse(
            _sse(service.watch(user, job_id, timeout)), media_type="text/event-stream"
        )

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobOut,
        responses={**_AUTH, **_NOT_FOUND, 409: {"model": Problem}},
    )
    async def cancel_job(job_id: JobId, user: User) -> JobOut:
        """Cancel a job that has not ended: drop it from the queue, or stop it."""
        job, cancelled = await service.cancel(user, job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        if not cancelled:
            ended = {"succeeded": "it succeeded", "failed": "it failed"}
            raise HTTPException(
                409, f"the job has already ended: {ended.get(job.state.value, 'it was cancelled')}"
            )
        return job_out(job)

    @app.post(
        "/v1/run/{task}",
        response_model=RunOut,
        responses={
            **_AUTH,
            **_REFUSALS,
            **_BAD_BODY,
            **_UNFIT,
            404: {"model": Problem},
            504: {"model": Problem},
        },
    )
    async def run_task(
        task: Annotated[str, Path(max_length=200)],
        user: User,
        body: RunIn | None = None,
        timeout: Annotated[float, Query(ge=0.001, le=300, description="Deadline in seconds.")] = 30,
    ) -> RunOut:
        """Run a task now and answer with its result (request/response style; not stored)."""
        task_of(task)
        body = body or RunIn()
        arguments_fit(task, body.args, body.kwargs)
        try:
            outcome: RunResult = await service.run(user, task, body.args, body.kwargs, timeout)
        except TimeoutError:
            raise HTTPException(504, f"the task did not finish within {timeout:g} s") from None
        state: Literal["succeeded", "failed"] = (
            "succeeded" if outcome.state is JobState.SUCCEEDED else "failed"
        )
        return RunOut(
            state=state,
            result=outcome.result,
            error=ErrorOut(**outcome.error) if outcome.error else None,
            duration_ms=round(outcome.duration * 1000, 3),
        )

    @app.get("/v1/tasks", response_model=list[TaskOut], responses=_AUTH)
    async def list_tasks(user: User) -> list[TaskOut]:
        """List the tasks this service runs."""
        return [
            TaskOut(
                name=spec.name,
                pool=spec.pool,
                is_async=spec.is_async,
                parameters=list(spec.signature.parameters) if spec.signature else [],
                doc=spec.doc,
            )
            for spec in service.tasks.values()
        ]

    @app.get("/v1/stats", tags=["operations"])
    async def stats(request: Request) -> dict[str, Any]:
        """Live figures for the dashboard: throughput, queues, latencies, loop lag.

        Queue depth per user names users, so it is shown only to clients on this machine
        (or with keys off); others see the totals.
        """
        figures = service.stats()
        client = request.client.host if request.client else ""
        if service.config.auth and not is_loopback(client):
            figures["queue"]["by_user"] = {}
        return figures

    @app.get("/healthz", tags=["operations"], responses={503: {"model": Problem}})
    async def healthz() -> AsciiJSON:
        """Say whether the server takes work."""
        serving = service.state is Lifecycle.SERVING
        return AsciiJSON(
            {"status": "ok" if serving else service.state.value}, 200 if serving else 503
        )

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics."""
        service.refresh_gauges()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        page = resources.files("escala.service").joinpath("dashboard.html").read_text("utf-8")
        return HTMLResponse(page)

    gate = Gate(max_inflight=service.config.max_inflight, max_waiting=service.config.max_waiting)
    app.add_middleware(BodyLimit, limit=service.config.max_body)
    if service.config.admission:
        app.add_middleware(
            AdmissionMiddleware,
            gate=gate,
            exempt=("/healthz", "/metrics"),
            unlimited=("/v1/jobs/",),
            on_refuse=service.metrics.rejected.labels("busy").inc,
        )
    app.state.gate = gate
    return app


async def _sse(changes: AsyncIterator[Job | Progress]) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    async for change in changes:
        if isinstance(change, Job):
            data = json.dumps(job_out(change).model_dump(mode="json"), separators=(",", ":"))
            yield f"event: {change.state.value}\ndata: {data}\n\n"
        else:
            data = json.dumps({"id": change.job_id, "done": change.done, "note": change.note})
            yield f"event: progress\ndata: {data}\n\n"
