"""The API's operations: module-level routers whose handlers find the service in the app.

::

    jobs        POST /v1/jobs, GET /v1/jobs/{id}, its /wait and /events, DELETE /v1/jobs/{id}
    run         POST /v1/run/{task}: a task run in the request, never stored
    operations  GET /v1/tasks, /v1/stats, /healthz, /metrics
    pages       GET /, the live dashboard (not in the schema)

``create_app`` keeps its service in ``app.state.service``; handlers take it from there
(``ServiceDep``) and the caller from their API key (``User``), so the same routers serve
any number of apps, each with its own service.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from ..store import Job, JobState, NewJob
from ._config import is_loopback
from ._core import Service
from ._schemas import AsciiJSON, ErrorOut, JobIn, JobOut, Problem, RunIn, RunOut, TaskOut, job_out
from ._types import JobProgress, Lifecycle, RunResult

__all__ = ["ROUTERS", "ServiceDep", "User", "current_user", "get_service"]

LOCAL_USER = "local"
JobId = Annotated[str, Path(max_length=64, description="The id the job was given at submission.")]


# -- what handlers take from the request ----------------------------------------------------

# Every dependency here is `async def`: FastAPI runs a plain `def` one on a worker thread.


async def get_service(request: Request) -> Service:
    """Return the service behind the app that took this request."""
    # a mounted app's requests carry the mounted app, so this is always escala's own
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
_bearer = HTTPBearer(auto_error=False, description="An API key made with `escala keys add`.")


async def current_user(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Return who is asking, from their API key (or ``local`` without keys).

    Raises:
        HTTPException: 401, when keys are on and the request has no valid one.
    """
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


def _task_of(service: Service, name: str) -> None:
    if name not in service.tasks:
        raise HTTPException(404, f"no task named {name!r}; GET /v1/tasks lists them")


def _arguments_fit(service: Service, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    try:
        service.tasks[name].check_arguments(args, kwargs)
    except TypeError as exc:
        raise HTTPException(422, f"the arguments do not fit task {name!r}: {exc}") from None


# -- the answers each operation documents ---------------------------------------------------

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


# -- jobs: stored, run later, watched -------------------------------------------------------

jobs = APIRouter()


@jobs.post(
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
async def submit(body: JobIn, user: User, response: Response, service: ServiceDep) -> JobOut:
    """Queue a job; answered only once the job is durably stored."""
    _task_of(service, body.task)
    _arguments_fit(service, body.task, body.args, body.kwargs)
    new = NewJob(user, body.task, body.args, body.kwargs, body.priority, body.idempotency_key)
    job, created = await service.submit(new)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


@jobs.get("/v1/jobs/{job_id}", response_model=JobOut, responses={**_AUTH, **_NOT_FOUND})
async def get_job(job_id: JobId, user: User, service: ServiceDep) -> JobOut:
    """Show a job: its state, and its result or error once it has ended."""
    job = await service.get(user, job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    return job_out(job)


@jobs.get(
    "/v1/jobs/{job_id}/wait",
    response_model=JobOut,
    responses={**_AUTH, **_NOT_FOUND, **_REFUSALS},
)
async def wait_job(
    job_id: JobId,
    user: User,
    service: ServiceDep,
    timeout: Annotated[float, Query(ge=0, le=60, description="Seconds to wait at most.")] = 30,
) -> JobOut:
    """Wait until the job ends or ``timeout`` passes, then show it (long-poll)."""
    last = None
    release = service.watchers.claim(user)
    try:
        async for change in service.watchers.follow(user, job_id, timeout):
            if isinstance(change, Job):
                last = change
    finally:
        release()
    if last is None:
        raise HTTPException(404, "no such job")
    return job_out(last)


@jobs.get(
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
    service: ServiceDep,
    timeout: Annotated[float, Query(ge=0, le=3600, description="Seconds to stream.")] = 300,
) -> StreamingResponse:
    """Stream the job as server-sent events until it ends: an event named after each
    state it enters (data: the job), and ``progress`` events its task reports."""
    if await service.watchers.read(user, job_id) is None:
        raise HTTPException(404, "no such job")
    # the place is taken before the answer starts, so that a refusal is a 429 or 503
    # rather than a stream cut short; the response gives it back however it ends
    release = service.watchers.claim(user)
    return _Stream(_sse(service.watchers.follow(user, job_id, timeout)), release)


@jobs.delete(
    "/v1/jobs/{job_id}",
    response_model=JobOut,
    responses={**_AUTH, **_NOT_FOUND, 409: {"model": Problem}},
)
async def cancel_job(job_id: JobId, user: User, service: ServiceDep) -> JobOut:
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


class _Stream(StreamingResponse):
    """A stream that gives its watcher's place back when it ends, however it ends.

    The generator's own ``finally`` would not do: a client that goes away before the
    first chunk leaves the generator unstarted, and an unstarted generator runs no
    ``finally``.
    """

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _sse(changes: AsyncIterator[Job | JobProgress]) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    async for change in changes:
        if isinstance(change, Job):
            data = json.dumps(job_out(change).model_dump(mode="json"), separators=(",", ":"))
            yield f"event: {change.state.value}\ndata: {data}\n\n"
        else:
            data = json.dumps({"id": change.job_id, "done": change.done, "note": change.note})
            yield f"event: progress\ndata: {data}\n\n"


# -- run: a task in the request, never stored -----------------------------------------------

run = APIRouter()


@run.post(
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
    service: ServiceDep,
    body: RunIn | None = None,
    timeout: Annotated[float, Query(ge=0.001, le=300, description="Deadline in seconds.")] = 30,
) -> RunOut:
    """Run a task now and answer with its result (request/response style; not stored)."""
    _task_of(service, task)
    body = body or RunIn()
    _arguments_fit(service, task, body.args, body.kwargs)
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


# -- operations: what the service offers, and how it is doing ------------------------------

operations = APIRouter()


@operations.get("/v1/tasks", response_model=list[TaskOut], responses=_AUTH)
async def list_tasks(user: User, service: ServiceDep) -> list[TaskOut]:
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


@operations.get("/v1/stats", tags=["operations"])
async def stats(request: Request, service: ServiceDep) -> dict[str, Any]:
    """Live figures for the dashboard: throughput, queues, latencies, loop lag.

    Queue depth per user names users, so it is shown only to clients on this machine
    (or with keys off); others see the totals.
    """
    figures = service.stats()
    client = request.client.host if request.client else ""
    if service.config.auth and not is_loopback(client):
        figures["queue"]["by_user"] = {}
    return figures


@operations.get("/healthz", tags=["operations"], responses={503: {"model": Problem}})
async def healthz(service: ServiceDep) -> AsciiJSON:
    """Say whether the server takes work."""
    serving = service.state is Lifecycle.SERVING
    return AsciiJSON({"status": "ok" if serving else service.state.value}, 200 if serving else 503)


@operations.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics."""
    service.refresh_gauges()
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- pages: the live dashboard, for people rather than programs ---------------------------

pages = APIRouter()


@pages.get("/", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """Serve the dashboard, a self-contained page that polls ``/v1/stats``."""
    page = resources.files("escala.service").joinpath("dashboard.html").read_text("utf-8")
    return HTMLResponse(page)


# In the order their routes are matched.
ROUTERS = (jobs, run, operations, pages)
