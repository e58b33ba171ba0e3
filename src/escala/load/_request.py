"""Sending one request and naming its outcome; the target checks done before a run.

aiohttp's connector caps connections at 100 by default: a request over that cap waits in
the client, unseen, which is the very delay a load generator must not hide. The session
here allows exactly as many connections as requests may be in flight, keeps them alive,
and counts its timeout from the moment the request is handed to it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from urllib.parse import urlsplit

import aiohttp

from ._record import Verdict
from ._spec import LoadError, LoadSpec

__all__ = [
    "cancel_all",
    "check_target",
    "default_headers",
    "ensure_allowed",
    "open_session",
    "send",
    "wait_idle",
]


def open_session(spec: LoadSpec, connections: int) -> aiohttp.ClientSession:
    """Return a session for ``spec`` with up to ``connections`` kept-alive connections."""
    _allow_files(connections + 64)
    connector = aiohttp.TCPConnector(
        limit=connections,
        limit_per_host=0,  # the one limit above is the one that counts
        keepalive_timeout=max(30.0, spec.timeout),
        ttl_dns_cache=None,  # resolve once: a run measures the server, not the resolver
    )
    return aiohttp.ClientSession(
        connector=connector,
        # aiohttp rounds deadlines of 5 s and more up to the next whole second, so a
        # 5 s timeout fired at up to 6 s; the threshold out of reach keeps them exact
        timeout=aiohttp.ClientTimeout(total=spec.timeout, ceil_threshold=float("inf")),
        headers=dict(spec.headers),
        # no cookies kept between requests: every request is the same request
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,  # the generator's CPU is for sending
    )


def _allow_files(needed: int) -> None:
    """Raise this process's soft limit on open files towards ``needed``, if it is lower.

    Each connection is a file descriptor; a soft limit of 1,024 (a common default) would
    turn the 1,025th connection into "too many open files" errors, reported as if the
    server had refused them. The hard limit is left alone: past it, the errors are real.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass  # the errors will say "too many open files", which is the truth


def default_headers(spec: LoadSpec) -> dict[str, str]:
    """Return the headers a body needs unless the user gave them (JSON by default)."""
    given = {name.lower() for name, _ in spec.headers}
    if spec.body is not None and "content-type" not in given:
        return {"Content-Type": "application/json"}
    return {}


async def send(
    session: aiohttp.ClientSession, spec: LoadSpec, headers: dict[str, str]
) -> tuple[Verdict, int, str]:
    """Send the request once and read the whole answer.

    Returns:
        the outcome, the HTTP status (0 without an answer), and for a timeout or a
        connection error a short description of what happened.
    """
    try:
        async with session.request(
            spec.method, spec.url, data=spec.body, headers=headers, allow_redirects=False
        ) as response:
            await response.read()
            return Verdict.of_status(response.status), response.status, ""
    except TimeoutError:
        return Verdict.TIMEOUT, 0, f"no complete answer within {spec.timeout:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        return Verdict.CONNECTION, 0, describe(exc)


def describe(exc: BaseException) -> str:
    """Say in a few words why a connection failed."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _addresses(host: str, port: int) -> list[str]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LoadError(f"cannot resolve the host {host!r}: {exc.strerror}") from None
    return [str(info[4][0]) for info in found]


def ensure_allowed(spec: LoadSpec) -> None:
    """Refuse a target on another machine unless ``allow_remote`` says so.

    Raises:
        LoadError: the host does not resolve, or not to loopback addresses only.
    """
    parts = urlsplit(spec.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if spec.allow_remote or all(_is_loopback(a) for a in _addresses(host, port)):
        return
    raise LoadError(
        f"{host} is not this machine: load only services you run, and say so with "
        "--allow-remote (allow_remote=True)"
    )


def check_target(spec: LoadSpec, timeout: float = 3.0) -> None:
    """Open one TCP connection to the target and close it, so a run starts only if it can.

    Raises:
        LoadError: the host does not resolve, is not allowed, or does not accept.
    """
    ensure_allowed(spec)
    parts = urlsplit(spec.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=min(timeout, spec.timeout)):
            pass
    except TimeoutError:
        raise LoadError(
            f"cannot connect to {spec.url}: no answer within {min(timeout, spec.timeout):g} s"
        ) from None
    except OSError as exc:
        raise LoadError(f"cannot connect to {spec.url}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running, on that port?)"
    return (exc.strerror or str(exc)).lower()


async def wait_idle(tasks: set[asyncio.Task[None]], timeout: float) -> None:
    """Wait up to ``timeout`` for ``tasks``, then cancel the rest and wait for them."""
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
    await cancel_all(tasks)


async def cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended (without raising their errors)."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
