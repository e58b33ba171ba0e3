"""What a load run is asked to do: :class:`LoadSpec`, durations, and the mistakes it refuses.

Everything here is checked once, when the spec is made, so that a run never starts with a
request it cannot send or a bound it cannot keep. Nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from urllib.parse import urlsplit

__all__ = [
    "MAX_DURATION",
    "MAX_REQUESTS",
    "Arrivals",
    "LoadError",
    "LoadSpec",
    "Model",
    "check_url",
    "parse_body",
    "parse_duration",
    "parse_header",
]

# Every run stops by itself: at most an hour, at most ten million requests, whatever asked.
MAX_DURATION = 3600.0
MAX_REQUESTS = 10_000_000

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|)\s*", re.IGNORECASE)
_FORMS = "a number with a unit, such as 500ms, 30s, 2m or 1h (a bare number is seconds)"


class LoadError(ValueError):
    """A load run that cannot be done as asked: a bad spec, or a target out of reach."""


class Model(enum.Enum):
    """How requests are paced."""

    # requests leave at intended times, whatever earlier ones are doing (--rate)
    OPEN = "open"
    # N users, each sending its next request when the previous one is answered (--users)
    CLOSED = "closed"


class Arrivals(enum.Enum):
    """How the open model spaces its intended send times."""

    CONSTANT = "constant"  # evenly: one every 1/rate seconds
    POISSON = "poisson"  # independent arrivals: exponential gaps of mean 1/rate


def parse_duration(text: str) -> float:
    """Return the seconds in ``"500ms"``, ``"30s"``, ``"2m"``, ``"1h"`` or ``"2.5"``.

    Raises:
        LoadError: the text is not one of those forms, or is not above zero.
    """
    found = _DURATION.fullmatch(text)
    if not found:
        raise LoadError(f"cannot read the duration {text!r}: give {_FORMS}")
    seconds = float(found.group(1)) * _UNITS[found.group(2).lower()]
    if not seconds > 0:
        raise LoadError(f"the duration must be above 0, got {text!r}")
    return seconds


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """One load run: the request, how it is paced, and its bounds.

    Give ``rate`` for the open model or ``users`` for the closed one; with neither, one
    user sends one request after another (the closed model with ``users=1``).

    Args:
        url: the target, ``http://`` or ``https://`` with a host.
        rate: requests per second, for the open model.
        users: concurrent users, for the closed model.
        duration: seconds of sending.
        requests: stop after this many requests, if that comes before the duration.
        arrivals: constant spacing or Poisson arrivals (open model).
        processes: generator processes, each with its own event loop and its share of the
            rate or users; ``None`` lets :func:`~escala.load.run` choose.
        max_inflight: requests in flight at once, across processes (open model): a request
            due when they are all taken is counted as dropped, never sent late.
        timeout: seconds a request may take before it counts as a timeout.
        think: seconds each user waits between an answer and its next request.
        method: the HTTP method; empty means GET, or POST when there is a body.
        headers: extra headers, as (name, value) pairs.
        body: the request body.
        seed: seed of the Poisson arrivals, for runs that repeat.
        allow_remote: allow a target that is not on this machine.

    Raises:
        LoadError: a value out of range, a malformed URL, or both rate and users.
    """

    url: str
    rate: float | None = None
    users: int | None = None
    duration: float = 10.0
    requests: int | None = None
    arrivals: Arrivals = Arrivals.CONSTANT
    processes: int | None = None
    max_inflight: int = 10_000
    timeout: float = 10.0
    think: float = 0.0
    method: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    seed: int | None = None
    allow_remote: bool = False

    def __post_init__(self) -> None:
        check_url(self.url)
        if self.rate is not None and self.users is not None:
            raise LoadError("give --rate (open model) or --users (closed model), not both")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise LoadError(f"--rate must be above 0 (requests per second), got {self.rate:g}")
        if self.rate is None and self.users is None:
            object.__setattr__(self, "users", 1)
        if self.users is not None and self.users < 1:
            raise LoadError(f"--users must be 1 or more, got {self.users}")
        if not 0 < self.duration <= MAX_DURATION:
            raise LoadError(
                f"--duration must be above 0 and at most {MAX_DURATION / 3600:g}h, "
                f"got {self.duration:g} s"
            )
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise LoadError(f"--requests must be between 1 and {MAX_REQUESTS:,}")
        if self.processes is not None and self.processes < 1:
            raise LoadError(f"--processes must be 1 or more, got {self.processes}")
        if self.max_inflight < 1:
            raise LoadError(f"--max-inflight must be 1 or more, got {self.max_inflight}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise LoadError(f"--timeout must be above 0 seconds, got {self.timeout:g}")
        if not (self.think >= 0 and math.isfinite(self.think)):
            raise LoadError(f"--think must be 0 or more seconds, got {self.think:g}")
        # a plain "poisson" is accepted too, as the CLI and JSON configs give it
        object.__setattr__(self, "arrivals", _arrivals(self.arrivals))
        method = (self.method or ("POST" if self.body is not None else "GET")).upper()
        if not re.fullmatch(r"[A-Z]+", method):
            raise LoadError(f"-X must be an HTTP method such as GET or POST, got {method!r}")
        object.__setattr__(self, "method", method)
        for name, value in self.headers:
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or "\n" in value:
                raise LoadError(f"-H must look like 'Name: value', got {name!r}: {value!r}")

    @property
    def model(self) -> Model:
        """The open model when a rate is given, else the closed one."""
        return Model.OPEN if self.rate is not None else Model.CLOSED

    @property
    def limit(self) -> int:
        """The most requests this run may send."""
        return min(self.requests or MAX_REQUESTS, MAX_REQUESTS)

    def describe(self) -> str:
        """Say in a few words how the requests are paced, e.g. ``open model, 200/s``."""
        if self.rate is not None:
            pacing = f"open model, {self.rate:,.6g}/s {self.arrivals.value}"
        else:
            think = f", think {self.think:g} s" if self.think else ""
            pacing = f"closed model, {self.users} user{'s' if self.users != 1 else ''}{think}"
        cap = f", at most {self.requests:,} requests" if self.requests else ""
        return f"{pacing}, {self.duration:g} s{cap}"


def check_url(url: str) -> None:
    """Raise :class:`LoadError` unless ``url`` is http(s) with a host and a valid port."""
    shape = "it must look like http://HOST[:PORT]/PATH"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise LoadError(f"malformed URL {url!r}: {exc}; {shape}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadError(f"malformed URL {url!r}: {shape}")
    if port == 0:
        raise LoadError(f"malformed URL {url!r}: port 0 is not a port to connect to")


def parse_body(text: str) -> bytes:
    """Return inline JSON as bytes to send, checked.

    Raises:
        LoadError: the text is not JSON.
    """
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoadError(
            f"--body is not valid JSON ({exc.msg} at column {exc.colno}); "
            "use --body-file FILE to send anything else"
        ) from None
    return text.encode()


def parse_header(text: str) -> tuple[str, str]:
    """Return ``"Name: value"`` as ``("Name", "value")``.

    Raises:
        LoadError: there is no colon or no name.
    """
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise LoadError(f"-H must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _arrivals(value: object) -> Arrivals:
    try:
        return Arrivals(value)
    except ValueError:
        known = ", ".join(a.value for a in Arrivals)
        raise LoadError(f"--arrivals must be one of {known}, got {value!r}") from None
