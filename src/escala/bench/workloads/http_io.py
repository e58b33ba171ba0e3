"""http-io: real HTTP requests to a local server that takes 20 ms to answer each one.

::

    prepared() ──starts──▶ ThreadingHTTPServer on 127.0.0.1:<free port>   (thread "serve")
        │                     └─ one thread per request: wait 20 ms, answer {"item": i}
        ▼
    fetch(url)   urllib.request, no proxy, a timeout     ─┐
    afetch(url)  asyncio streams, raw HTTP/1.1 GET        ─┴▶ the same dict for the same URL
        │
    exit ──▶ shutdown() + server_close() (joins the request threads) + join("serve")

Only 127.0.0.1 is ever contacted: the items are the only URLs, and the opener ignores any
proxy set in the environment.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .base import Prepared, Workload, scaled

__all__ = ["HttpIO", "afetch", "fetch"]

_TASKS = 40
_DELAY = 0.02  # what the server takes to answer, like a fast real service
_TIMEOUT = 10.0
# No ProxyHandler entries: an http_proxy in the environment must not reroute loopback calls.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str) -> dict[str, Any]:
    """GET ``url`` with urllib and return the decoded JSON body."""
    with _OPENER.open(url, timeout=_TIMEOUT) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


async def afetch(url: str) -> dict[str, Any]:
    """GET ``url`` over asyncio streams and return the decoded JSON body.

    Raises:
        OSError: the server answered with a status other than 200.
    """
    parts = urlsplit(url)
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
    async with asyncio.timeout(_TIMEOUT):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(request.encode("ascii"))
            await writer.drain()
            raw = await reader.read()  # the server closes the connection after its answer
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        raise OSError(f"GET {url} answered {head.splitlines()[:1]!r}")
    body: dict[str, Any] = json.loads(payload)
    return body


class _Handler(BaseHTTPRequestHandler):
    timeout = _TIMEOUT  # a client that never sends its request cannot hold a thread forever

    def do_GET(self) -> None:
        prefix, _, number = self.path.rpartition("/")
        if prefix != "/item" or not number.isdigit():
            self.send_error(404, "try /item/<number>")
            return
        time.sleep(_DELAY)
        body = json.dumps({"item": int(number), "ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the demo's output clean: one line per request would drown the table."""


class _Server(ThreadingHTTPServer):
    # Request threads are joined by server_close(), so nothing outlives prepared().
    daemon_threads = False
    block_on_close = True
    # Async mode opens every connection at once; the default backlog of 5 would drop some.
    request_queue_size = 256


@contextmanager
def serving() -> Iterator[str]:
    """Run the local server; yield its base URL (``http://127.0.0.1:<port>``)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="escala-bench-http"
    )
    try:
        thread.start()
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}"
    finally:
        if thread.is_alive():
            server.shutdown()
            thread.join()
        server.server_close()


class HttpIO(Workload):
    name = "http-io"
    title = "HTTP requests (local server)"
    expected = "threads"
    explanation = (
        "Each request waits 20 ms for the server; the waits overlap on threads or "
        "coroutines, while processes only add their start-up cost."
    )

    @contextmanager
    def prepared(self, scale: float = 1.0) -> Iterator[Prepared]:
        tasks = scaled(_TASKS, scale, least=2)
        with serving() as base:
            yield Prepared(fetch, [f"{base}/item/{i}" for i in range(tasks)], afetch)
