"""Open connections: a cap below the descriptor limit, and deadlines for idle and slow ones.

uvicorn's h11 protocol, guarded where uvicorn leaves a server open to any client that
connects and stays silent:

- A connection that never sends a byte is never closed: uvicorn's keep-alive timer
  starts only once a response is sent.
- A request head sent a byte at a time (slowloris) is never timed: its first byte
  cancels the keep-alive timer, and nothing times the rest.
- ``limit_concurrency`` answers 503 only to a request it has read, which a silent
  connection never sends, and to ``/healthz`` as readily as to anything; meanwhile every
  such connection holds a descriptor, and at the descriptor limit asyncio's accept loop
  fails (``_loop.quiet_accept_errors``) and the server answers nobody.

What uvicorn does do is used as it is: ``timeout_keep_alive`` for idle connections
between requests, and h11's bound on the size of a request head (16 KiB).

One connection's life::

    accepted ──> at the cap? ──yes──> close the longest idle connection to make room;
       │                              none idle: a minimal 503, Connection: close
       v
    waiting for a head (header_timeout, from the connection or the next request's
       │               first byte; when it passes: closed, with a 408 if part came)
       │ a whole head
       v
    handling its request (admission control and the routes' own deadlines bound it)
       │ the response sent
       v
    idle (uvicorn's keep-alive timer) ──a byte of the next request──> waiting for a head

A connection is idle, and may be closed to make room, from when it is accepted or its
last response is sent until a whole request head has come: the one closed is the one
idle the longest, as nginx reuses its idle keep-alive connections when it runs short.
A flood of silent connections thus only displaces silent connections, and a client
that sends its request at once (a health check) keeps its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if sys.platform != "win32":  # Windows has no descriptor limit to raise
    import resource

__all__ = [
    "ConnectionGuard",
    "Descriptors",
    "accept_batch",
    "connection_cap",
    "descriptors",
    "guarded_protocol",
]

log = logging.getLogger("escala.service")

#: seconds a connection told 408 is still read from (and what it sends dropped) before it
#: is closed: closed at once, what it sends next would make the kernel answer with a
#: reset, which can destroy the 408 before the client reads it (nginx's lingering close)
LINGER = 2.0

#: kept free beyond the cap, at least: for the store, the pools' pipes, files the tasks
#: open, and the connections accepted but not yet counted (``accept_batch``)
RESERVE = 64


def _minimal(status: int, reason: str, detail: str, retry_after: int | None) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_FULL = _minimal(
    503,
    "Service Unavailable",
    "the server has as many connections open as it can take; retry after 1 s",
    1,
)


@dataclass(frozen=True, slots=True)
class Descriptors:
    """This process's file descriptors: the limit, and how many are open."""

    limit: int  # the soft limit, after raising it
    was: int  # the soft limit before
    in_use: int  # open now


def descriptors(*, raise_limit: bool = True) -> Descriptors:
    """Raise the soft descriptor limit to the hard one, and count the descriptors open.

    Shells, systemd services and containers commonly start a process with a soft limit
    of 1,024 under a much higher hard one: a server that keeps the soft one runs out of
    descriptors at a thousand connections for nothing.
    """
    if sys.platform == "win32":
        return Descriptors(limit=0, was=0, in_use=0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    was = soft
    if raise_limit and soft != hard:
        # an unlimited hard limit is capped by the kernel (Linux's nr_open, 1,048,576 by
        # default; macOS refuses more than OPEN_MAX): ask for that much, else keep it
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return Descriptors(limit=soft, was=was, in_use=_open_descriptors())


def _open_descriptors() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(folder)) - 1  # less the one listdir itself opened
    return RESERVE  # unknown: a guess of the same size as the reserve


def connection_cap(fds: Descriptors, asked: int | None) -> tuple[int, str | None]:
    """Return the connection cap for a descriptor limit, and a warning if ``asked`` was
    more than the limit leaves room for (the cap is then lowered to that room).

    The room is the limit less the descriptors open at start and a reserve of an
    eighth of the limit (``RESERVE`` at least).

    Raises:
        ValueError: the limit leaves no room for even 16 connections.
    """
    if fds.limit == 0:  # no limit known
        return (asked if asked is not None else 10_000), None
    reserve = max(RESERVE, fds.limit // 8)
    room = fds.limit - fds.in_use - reserve
    if room < 16:
        raise ValueError(
            f"the descriptor limit ({fds.limit}) leaves no room for connections beside the "
            f"{fds.in_use} files open and a reserve of {reserve}: raise it (ulimit -n)"
        )
    if asked is None:
        return room, None
    if asked > room:
        return room, (
            f"--max-connections {asked} is more than the descriptor limit leaves room for: "
            f"lowered to {room}"
        )
    return asked, None


def accept_batch(limit: int) -> int:
    """Return how many connections asyncio should accept at each turn of its loop.

    Accepted connections count against the cap only a turn or two later, when their
    protocol starts: a batch as large as the usual backlog (2,048) would take that many
    descriptors past the cap at once, more than the reserve, and run out of them.
    """
    reserve = max(RESERVE, limit // 8) if limit else RESERVE
    return max(8, min(256, reserve // 8))


class ConnectionGuard:
    """The open connections of one server, and which of them are idle.

    Args:
        limit: the most connections open at once.
        header_timeout: seconds to send a whole request head.
        on_shed: called with ``"evicted"``, ``"refused"`` or ``"header_timeout"`` at
            each connection closed or refused to keep the server reachable.
        report_every: seconds between two log lines counting such connections.
    """

    def __init__(
        self,
        limit: int,
        header_timeout: float,
        *,
        on_shed: Callable[[str], None] | None = None,
        report_every: float = 10.0,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if not 0 < header_timeout < math.inf:
            raise ValueError(f"header_timeout must be positive and finite, got {header_timeout!r}")
        self.limit = limit
        self.header_timeout = header_timeout
        self._on_shed = on_shed
        self._report_every = report_every
        self._open: set[GuardedH11Protocol] = set()
        # idle connections, the longest idle first
        self._idle: OrderedDict[GuardedH11Protocol, None] = OrderedDict()
        self.shed: Counter[str] = Counter()
        self._unreported: Counter[str] = Counter()
        self._report: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Return the number of connections open."""
        return len(self._open)

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Count a new connection in, making room if need be; ``False``: refuse it."""
        if len(self._open) >= self.limit:
            if not self._idle:
                self.count("refused")
                return False
            victim, _ = self._idle.popitem(last=False)
            self._open.discard(victim)  # its descriptor is freed at the loop's next turn
            victim.close()
            self.count("evicted")
        self._open.add(conn)
        return True

    def idle(self, conn: GuardedH11Protocol) -> None:
        """Mark a connection idle (closable to make room), the most recently so."""
        if conn in self._open:
            self._idle[conn] = None
            self._idle.move_to_end(conn)

    def busy(self, conn: GuardedH11Protocol) -> None:
        """Mark a connection busy with a request."""
        self._idle.pop(conn, None)

    def forget(self, conn: GuardedH11Protocol) -> None:
        """Count a connection out (closed)."""
        self._open.discard(conn)
        self._idle.pop(conn, None)

    def count(self, reason: str) -> None:
        """Count a connection closed or refused, and log the counts now and then."""
        self.shed[reason] += 1
        self._unreported[reason] += 1
        if self._on_shed is not None:
            self._on_shed(reason)
        if self._report is None:
            loop = asyncio.get_running_loop()
            self._report = loop.call_later(self._report_every, self._log)

    def _log(self) -> None:
        self._report = None
        what = {"evicted": "idle ones closed to make room", "refused": "refused (503)"}
        what["header_timeout"] = "closed for sending no whole request head in time"
        counts = ", ".join(f"{n} {what.get(r, r)}" for r, n in sorted(self._unreported.items()))
        log.warning(
            "connections at the cap (%d open at most) or too slow, in the last %g s: %s",
            self.limit,
            self._report_every,
            counts,
        )
        self._unreported.clear()

    def close(self) -> None:
        """Stop the log timer (the server is done)."""
        if self._report is not None:
            self._report.cancel()
            self._report = None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, under a ``ConnectionGuard`` (see the module's map)."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._part_of_a_head = False
        self._admitted = False
        self._lingering: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            # written by hand: the connection has sent nothing h11 could answer yet
            transport.write(_FULL)
            transport.close()
            return
        self._admitted = True
        self.guard.idle(self)
        self._time_the_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timing_the_head()
        if self._lingering is not None:
            self._lingering.cancel()
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self._lingering is not None:
            return
        if self._waiting_for_a_head():
            self._part_of_a_head = True
            if self._head_timer is None:  # the first byte of a kept-alive connection's next request
                self._time_the_head()
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a whole head came: its request runs
            self._stop_timing_the_head()
            self._part_of_a_head = False
            self.guard.busy(self)

    def on_response_complete(self) -> None:
        before = self.cycle
        super().on_response_complete()  # may start a pipelined request at once
        if self.cycle is before and not self.transport.is_closing():
            self.guard.idle(self)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # another protocol takes the transport over: this one hears no connection_lost
        self._stop_timing_the_head()
        self.guard.forget(self)
        super().handle_websocket_upgrade(event)

    def close(self) -> None:
        """Close the connection, as its idle timeout would."""
        self._stop_timing_the_head()
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def _waiting_for_a_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _time_the_head(self) -> None:
        self._head_timer = self.loop.call_later(self.guard.header_timeout, self._too_slow)

    def _stop_timing_the_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self.guard.count("header_timeout")
        if not self._part_of_a_head or not self.transport.can_write_eof():
            self.close()  # a silent client hears nothing
            return
        # a slow client may be a real one: tell it why, and linger
        timeout = self.guard.header_timeout
        detail = f"the request head did not arrive within {timeout:g} s"
        self.transport.write(_minimal(408, "Request Timeout", detail, None))
        self.transport.write_eof()
        self._lingering = self.loop.call_later(LINGER, self.transport.close)


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """Return the protocol class to give uvicorn (``http=``) for connections under ``guard``.

    A class per guard, since uvicorn makes the protocol from its class with arguments
    of its own choosing.
    """

    class Guarded(GuardedH11Protocol):
        pass

    Guarded.guard = guard
    return Guarded
