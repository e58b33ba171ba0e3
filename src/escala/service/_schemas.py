"""What the HTTP API reads and writes: request bodies, answers, and the JSON they travel in.

Bodies accept JSON values only, finite ones; answers are written by ``AsciiJSON``, so that
whatever a client sent can be sent back to it.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from ..store import Job

__all__ = [
    "AsciiJSON",
    "ErrorOut",
    "JobIn",
    "JobOut",
    "Problem",
    "RunIn",
    "RunOut",
    "TaskOut",
    "job_out",
]


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
