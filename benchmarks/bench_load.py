"""escala load against wrk and a plain aiohttp loop: requests per second of one generator.

Run from the repository root::

    .venv/bin/python benchmarks/bench_load.py [--quick] [--connections C] [--duration S]
        [--repeat N] [--markdown PATH] [--json PATH]

Two targets, each started here on 127.0.0.1 and stopped by its own pid:

- a fast server that is not the bottleneck: nginx with one worker answering ``200 ok``
  from its config (``apt-get install -y nginx``), or, without nginx, a minimal aiohttp
  server in its own process (several times slower: then it may be the bottleneck);
- ``escala serve --app escala.service.examples --no-auth``: ``POST /v1/run/echo``
  with the body ``{"args":[1]}``.

On each, the closed model at its maximum (C connections, S seconds, the same for all):
``wrk -t1 -cC`` (``apt-get install -y wrk``; the row is skipped without it), escala load
with ``users=C`` in one process and in two, and a plain aiohttp loop (C coroutines each
posting or getting and reading the answer, nothing recorded: the naive baseline). Then the
open model against the fast server: the highest rate at which one escala generator process
stays valid (rates in steps). Every Python client runs in a fresh process; its CPU time
(its own and its reaped children's) is taken around the run, the server's from its
processes, so that the table says which side ran out of CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil

from benchlib import Table, machine_line, markdown, show, warn_stray_children

ECHO_BODY = b'{"args":[1]}'
# A run's figure is trusted only if its client answered with 2xx for this share at least.
OK_SHARE = 0.99
TITLE = "4. escala load against wrk and a plain aiohttp loop"


# -- servers ----------------------------------------------------------------------------


@dataclass
class Target:
    """One endpoint under load and the processes that serve it."""

    key: str
    name: str
    url: str
    method: str = "GET"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    pids: list[int] = field(default_factory=list)


class Child:
    """A server subprocess whose output is drained and kept; stopped by its own pid."""

    def __init__(self, name: str, argv: list[str], *, cwd: str | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        self.seen = threading.Condition()
        out = self.process.stdout
        assert out is not None

        def drain() -> None:  # until the child exits, so that its pipe never fills
            for line in out:
                with self.seen:
                    self.lines.append(line)
                    self.seen.notify_all()
            with self.seen:
                self.seen.notify_all()

        self._reader = threading.Thread(target=drain, name=f"{name}-log", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Return the first match of ``pattern`` in the output, once it is there."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.seen:
            while True:
                for line in self.lines:
                    if hit := regex.search(line):
                        return hit
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} did not start:\n{self.text()}")
                self.seen.wait(min(left, 0.1))

    def wait_port(self, port: int, timeout: float = 30) -> None:
        """Return once something accepts connections on 127.0.0.1:``port``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start:\n{self.text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig``, then SIGKILL after ``timeout``; return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(30)
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "ok"; }}
    }}
}}
"""

AIOHTTP_SERVER = textwrap.dedent(
    """
    import socket, sys
    from aiohttp import web

    async def ok(request):
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None)
    """
)


@contextmanager
def fast_server(folder: Path) -> Iterator[Target]:
    """nginx (one worker) answering 200 "ok", or a minimal aiohttp server without nginx."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx:
        home = folder / "nginx"
        home.mkdir()
        port = free_port()
        conf = home / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=home, port=port))
        argv = [nginx, "-p", str(home), "-c", str(conf), "-e", str(home / "error.log")]
        server = Child("nginx", argv)
        name = f"nginx {nginx_version(nginx)} (1 worker), GET / → 200 ok"
        url = f"http://127.0.0.1:{port}/"
        try:
            server.wait_port(port)
        except RuntimeError:
            server.stop(signal.SIGQUIT)
            raise
    else:
        server = Child("aiohttp server", [sys.executable, "-c", AIOHTTP_SERVER])
        url = server.wait_for(r"listening on (http://\S+)").group(1)
        name = "aiohttp server (1 process; nginx not found), GET / → 200 ok"
    try:
        yield Target("fast", name, url, pids=[server.pid])
    finally:
        # nginx: SIGQUIT is its graceful stop (the master waits for its worker)
        server.stop(signal.SIGQUIT if nginx else signal.SIGTERM)


@contextmanager
def escala_server(folder: Path) -> Iterator[Target]:
    """``escala serve`` of the example tasks, without keys, on a free loopback port."""
    db = folder / "escala.db"
    argv = [sys.executable, "-m", "escala.cli", "serve", "--app", "escala.service.examples"]
    argv += ["--no-auth", "--host", "127.0.0.1", "--port", "0", "--db", str(db)]
    server = Child("escala serve", argv, cwd=str(folder))
    try:
        base = server.wait_for(r"listening on (http://\S+)").group(1).rstrip("/")
        headers = (("Content-Type", "application/json"),)
        yield Target(
            "escala",
            'escala serve, POST /v1/run/echo {"args":[1]}',
            f"{base}/v1/run/echo",
            "POST",
            ECHO_BODY,
            headers,
            [server.pid],
        )
    finally:
        server.stop()


def nginx_version(nginx: str) -> str:
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    found = re.search(r"nginx/(\S+)", done.stderr + done.stdout)
    return found.group(1) if found else "?"


def wrk_version() -> str | None:
    path = shutil.which("wrk")
    if path is None:
        return None
    done = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    found = re.search(r"wrk (\S+)", done.stdout + done.stderr)
    return found.group(1) if found else "?"


def check(target: Target) -> None:
    """Send one request and make sure the answer is the one expected."""
    request = urllib.request.Request(
        target.url, data=target.body, headers=dict(target.headers), method=target.method
    )
    for _ in range(20):  # also a small warm-up
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, text = answer.status, answer.read().decode()
    wanted = '"result":1' if target.key == "escala" else "ok"
    if status != 200 or wanted not in text.replace(" ", ""):
        raise RuntimeError(f"{target.name} answered {status}: {text[:200]}")


# -- CPU --------------------------------------------------------------------------------


def server_cpu(pids: list[int]) -> float:
    """CPU seconds the server processes and their children now alive have used."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    return total


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process, the kernel)."""
    times = psutil.cpu_times()
    idle = ("idle", "iowait", "guest", "guest_nice")  # guest time is counted in user already
    return sum(getattr(times, k) for k in times._fields if k not in idle)


def own_cpu() -> float:
    """CPU seconds of this process and of its children that have ended and been reaped."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class Window:
    """CPU of the server and of the whole machine between :meth:`open` and :meth:`close`."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def open(self) -> None:
        self.server0, self.busy0 = server_cpu(self.target.pids), busy_seconds()
        self.wall0 = time.perf_counter()

    def close(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall0
        return {
            "window_s": wall,
            "server_cores": (server_cpu(self.target.pids) - self.server0) / wall,
            "machine_cores": (busy_seconds() - self.busy0) / wall,
        }


# -- clients ----------------------------------------------------------------------------


def client(kind: str, target: Target, options: dict[str, Any], barrier: Any, out: Any) -> None:
    """Run one Python client in this (fresh) process; put its figures on ``out``."""
    try:
        # everything imported and made before the timing
        spec = _escala_spec(target, options) if kind == "escala" else None
        import aiohttp  # noqa: F401

        barrier.wait(60)
        cpu, wall = own_cpu(), time.perf_counter()
        figures = _run_escala(spec) if kind == "escala" else _run_naive(target, options)
        figures["client_cpu_s"] = own_cpu() - cpu
        figures["client_wall_s"] = time.perf_counter() - wall
        out.put(figures)
    except BaseException as exc:  # told to the parent, which raises it there
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        barrier.abort()  # the parent may still be waiting at the barrier


def _escala_spec(target: Target, options: dict[str, Any]) -> Any:
    from escala import load

    return load.LoadSpec(
        url=target.url,
        method=target.method,
        body=target.body,
        headers=target.headers,
        users=options.get("users"),
        rate=options.get("rate"),
        processes=options["processes"],
        duration=options["seconds"],
        timeout=5.0,
    )


def _run_escala(spec: Any) -> dict[str, Any]:
    from escala import load

    report = load.run(spec)
    outcomes = {outcome.key: n for outcome, n in report.outcomes.items() if n}
    return {
        "requests_per_s": report.throughput,
        "achieved_rate": report.achieved_rate,
        "answered": report.recorder.answered,
        "ok": report.outcomes[load.Verdict.OK],
        "outcomes": outcomes,
        "elapsed_s": report.elapsed,
        "valid": report.valid,
        "problems": report.problems,
        "p50_ms": report.ok.percentile(50) * 1e3,
        "p99_ms": report.ok.percentile(99) * 1e3,
        "lag_p99_ms": report.lag.percentile(99) * 1e3,
        "processes": report.processes,
        "dropped": report.dropped,
    }


def _run_naive(target: Target, options: dict[str, Any]) -> dict[str, Any]:
    """C coroutines on one aiohttp session, each sending and reading, counting answers."""
    import aiohttp

    users, seconds = options["users"], options["seconds"]

    async def main() -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=users)
        statuses: dict[int, int] = {}
        errors = 0
        async with aiohttp.ClientSession(
            connector=connector, headers=dict(target.headers)
        ) as session:
            loop = asyncio.get_running_loop()
            start = loop.time()
            end = start + seconds

            async def user() -> None:
                nonlocal errors
                while loop.time() < end:
                    try:
                        async with session.request(
                            target.method, target.url, data=target.body
                        ) as resp:
                            await resp.read()
                            statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    except (aiohttp.ClientError, OSError):
                        errors += 1

            await asyncio.gather(*(user() for _ in range(users)))
            elapsed = loop.time() - start
        answered = sum(statuses.values())
        outcomes: dict[str, int] = {str(s): n for s, n in statuses.items()}
        if errors:
            outcomes["connection errors"] = errors
        return {
            "requests_per_s": answered / elapsed,
            "answered": answered,
            "ok": sum(n for s, n in statuses.items() if 200 <= s < 300),
            "outcomes": outcomes,
            "elapsed_s": elapsed,
            "processes": 1,
        }

    return asyncio.run(main())


def run_python(kind: str, target: Target, options: dict[str, Any]) -> dict[str, Any]:
    """Run a Python client in a fresh process (spawned) and measure the server meanwhile."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    # not a daemon: escala load's own processes are its children
    proc = ctx.Process(target=client, args=(kind, target, options, barrier, out))
    proc.start()
    window = Window(target)
    try:
        try:
            barrier.wait(120)
        except threading.BrokenBarrierError:
            pass  # the client failed before it started: its error is on the queue
        window.open()
        figures = out.get(timeout=options["seconds"] + 90)
        figures.update(window.close())
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if "error" in figures:
        raise RuntimeError(f"{kind} client failed: {figures['error']}")
    figures["client_cores"] = figures["client_cpu_s"] / figures["client_wall_s"]
    return figures


WRK_POST = """\
wrk.method = "{method}"
wrk.body = [==[{body}]==]
{headers}
"""


def run_wrk(target: Target, users: int, seconds: float, folder: Path) -> dict[str, Any]:
    """``wrk -t1 -cC -dS`` on the target; its CPU from RUSAGE_CHILDREN around it."""
    argv = ["wrk", "-t1", f"-c{users}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    if target.method != "GET" or target.body:
        script = folder / f"wrk-{target.key}.lua"
        headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers)
        body = (target.body or b"").decode()
        script.write_text(WRK_POST.format(method=target.method, body=body, headers=headers))
        argv += ["-s", str(script)]
    argv.append(target.url)
    window = Window(target)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    window.open()
    wall = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    wall = time.perf_counter() - wall
    figures: dict[str, Any] = window.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = done.stdout + done.stderr
    rate = re.search(r"Requests/sec:\s*([\d.]+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if done.returncode != 0 or not rate or not total:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{text}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    outcomes = {"2xx or 3xx": int(total.group(1)) - (int(bad.group(1)) if bad else 0)}
    if bad:
        outcomes["other"] = int(bad.group(1))
    if socket_errors:
        outcomes["socket errors"] = socket_errors.group(1).strip()  # type: ignore[assignment]
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", text, re.MULTILINE))
    figures.update(
        requests_per_s=float(rate.group(1)),
        answered=int(total.group(1)),
        ok=outcomes["2xx or 3xx"],
        outcomes=outcomes,
        p50=latency.get("50"),
        p99=latency.get("99"),
        client_cpu_s=cpu,
        client_wall_s=wall,
        client_cores=cpu / wall,
        processes=1,
    )
    return figures


# -- measuring --------------------------------------------------------------------------


def limited_by(row: dict[str, Any], cores: int) -> str:
    """Say which side ran out of CPU: a client process, the server, or the machine."""
    per_process = row["client_cores"] / row["processes"]
    sides = (("client", per_process), ("server", row["server_cores"]))
    full = [side for side, used in sides if used >= 0.85]
    if full:
        return " and ".join(full) + " CPU"
    if row["machine_cores"] >= 0.85 * cores:
        return "the machine's cores"
    return "neither CPU"


TOOLS = ("wrk", "escala-1", "escala-2", "naive")
TOOL_NAMES = {
    "wrk": "wrk -t1 -c{c}",
    "escala-1": "escala load, closed, users={c}, 1 process",
    "escala-2": "escala load, closed, users={c}, processes=2",
    "naive": "plain aiohttp loop, {c} coroutines, 1 process",
}


def measure_closed(
    target: Target, users: int, seconds: float, repeat: int, folder: Path, have_wrk: bool
) -> dict[str, dict[str, Any]]:
    """Every tool on ``target``, taken in turn; the best requests/s of ``repeat`` runs."""
    best: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    for _ in range(repeat):
        for tool in TOOLS:
            if tool == "wrk":
                if not have_wrk:
                    continue
                row = run_wrk(target, users, seconds, folder)
            elif tool == "naive":
                row = run_python("naive", target, {"users": users, "seconds": seconds})
            else:
                processes = int(tool[-1])
                options = {"users": users, "seconds": seconds, "processes": processes}
                row = run_python("escala", target, options)
            runs[tool].append(row["requests_per_s"])
            print(
                f"  {target.key:6} {tool:8} {row['requests_per_s']:>9,.0f} requests/s, client "
                f"{row['client_cores']:.2f} cores, server {row['server_cores']:.2f}",
                flush=True,
            )
            if tool not in best or row["requests_per_s"] > best[tool]["requests_per_s"]:
                best[tool] = row
    for tool, row in best.items():
        row["all_runs"] = runs[tool]
    return best


def measure_open(
    target: Target, rates: list[float], seconds: float, misses: int
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """escala load's open model, one process, at rising rates until ``misses`` steps in a row
    are not valid; return every step and the highest valid one.

    A step that is not valid is run once more and its better attempt kept (as the closed
    rows keep their best run): a neighbour's burst should not end the climb.
    """
    steps: list[dict[str, Any]] = []
    failed = 0
    for rate in rates:
        attempts: list[dict[str, Any]] = []
        while len(attempts) < 2 and not (attempts and attempts[-1]["good"]):
            options = {"rate": rate, "seconds": seconds, "processes": 1}
            row = run_python("escala", target, options)
            row["rate"] = rate
            row["good"] = row["valid"] and row["ok"] >= OK_SHARE * row["answered"] > 0
            attempts.append(row)
            verdict = "valid" if row["good"] else "NOT valid: " + "; ".join(row["problems"])
            print(
                f"  open   {rate:>7,.0f}/s: achieved {row['achieved_rate']:>8,.0f}/s, "
                f"client {row['client_cores']:.2f} cores, {verdict}",
                flush=True,
            )
        row = max(attempts, key=lambda a: (a["good"], -a["lag_p99_ms"]))
        row["attempts"] = [
            {k: a[k] for k in ("good", "achieved_rate", "lag_p99_ms", "problems")} for a in attempts
        ]
        steps.append(row)
        failed = 0 if row["good"] else failed + 1
        if failed >= misses:
            break
    good = [step for step in steps if step["good"]]
    return steps, (max(good, key=lambda s: s["rate"]) if good else None)


# -- tables -----------------------------------------------------------------------------


def rest_of_machine(row: dict[str, Any]) -> float:
    """Busy cores neither the client nor the server used: the kernel's own work, others."""
    return max(0.0, row["machine_cores"] - row["client_cores"] - row["server_cores"])


def per_request(row: dict[str, Any]) -> str:
    """Client CPU per answered request, in microseconds."""
    return f"{row['client_cpu_s'] / row['answered'] * 1e6:.1f}" if row["answered"] else "n/a"


def disturbed(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Say which runs had the rest of the machine busy: another process, or the kernel."""
    busy = [
        f"{name} ({rest_of_machine(r):.2f})"
        for name, r in rows.items()
        if rest_of_machine(r) >= 0.3
    ]
    if not busy:
        return []
    return [
        "The rest of the machine was busy ≥ 0.3 core during "
        + ", ".join(busy)
        + ": another process or the kernel took CPU from client and server there."
    ]


def closed_table(
    target: Target,
    rows: dict[str, dict[str, Any]],
    users: int,
    seconds: float,
    repeat: int,
    cores: int,
) -> Table:
    runs = f"best of {repeat}" if repeat > 1 else "one run each"
    table = Table(
        f"Closed model on {target.name}: {users} connections, {seconds:g} s ({runs})",
        [
            "client",
            "requests/s",
            "ratio to wrk",
            "client CPU (cores)",
            "client CPU per request (µs)",
            "server CPU (cores)",
            "rest of machine (cores)",
            "2xx",
            "ran out of",
        ],
    )
    wrk = rows.get("wrk", {}).get("requests_per_s")
    for tool in TOOLS:
        name = TOOL_NAMES[tool].format(c=users)
        if tool not in rows:
            table.rows.append([name, "skipped: no wrk", *[""] * 7])
            continue
        row = rows[tool]
        ratio = f"{row['requests_per_s'] / wrk:.3f}×" if wrk else "n/a"
        share = row["ok"] / row["answered"] if row["answered"] else 0.0
        table.rows.append(
            [
                name,
                f"{row['requests_per_s']:,.0f}",
                ratio,
                f"{row['client_cores']:.2f}",
                per_request(row),
                f"{row['server_cores']:.2f}",
                f"{rest_of_machine(row):.2f}",
                f"{share:.1%}",
                limited_by(row, cores),
            ]
        )
    for tool in ("escala-1", "escala-2"):
        row = rows.get(tool)
        if row and not row["valid"]:
            table.notes.append(
                f"{TOOL_NAMES[tool].format(c=users)}: its report says not valid: "
                + "; ".join(row["problems"])
            )
    table.notes += disturbed({TOOL_NAMES[t].format(c=users): r for t, r in rows.items()})
    for tool, row in rows.items():
        if len(row["all_runs"]) > 1:
            every = ", ".join(f"{r:,.0f}" for r in row["all_runs"])
            table.notes.append(f"{TOOL_NAMES[tool].format(c=users)}: every run {every}/s")
    return table


def open_table(
    target: Target,
    steps: list[dict[str, Any]],
    best: dict[str, Any] | None,
    seconds: float,
    misses: int,
) -> Table:
    table = Table(
        f"Open model, one escala load process, on {target.name} ({seconds:g} s a step)",
        [
            "rate asked (/s)",
            "achieved (/s)",
            "answered (/s)",
            "p50 (ms)",
            "p99 (ms)",
            "send lag p99 (ms)",
            "client CPU (cores)",
            "client CPU per request (µs)",
            "server CPU (cores)",
            "rest of machine (cores)",
            "valid",
        ],
    )
    for step in steps:
        tries = len(step["attempts"])
        valid = ("yes" if step["good"] else "no") + (f" (try {tries})" if tries > 1 else "")
        if tries > 1 and step["good"]:
            first = step["attempts"][0]
            table.notes.append(
                f"{step['rate']:,.0f}/s, first try not valid: " + "; ".join(first["problems"]) + "."
            )
        if not step["good"]:
            why = "; ".join(step["problems"]) or f"{step['ok']:,} of {step['answered']:,} 2xx"
            table.notes.append(f"{step['rate']:,.0f}/s not valid (the better of 2 tries): {why}.")
        table.rows.append(
            [
                f"{step['rate']:,.0f}",
                f"{step['achieved_rate']:,.0f}",
                f"{step['requests_per_s']:,.0f}",
                f"{step['p50_ms']:.2f}",
                f"{step['p99_ms']:.2f}",
                f"{step['lag_p99_ms']:.2f}",
                f"{step['client_cores']:.2f}",
                per_request(step),
                f"{step['server_cores']:.2f}",
                f"{rest_of_machine(step):.2f}",
                valid,
            ]
        )
    table.notes += disturbed({f"{s['rate']:,.0f}/s": s for s in steps})
    if best is None:
        table.notes.append("No step was valid.")
    else:
        table.notes.append(
            f"Highest valid rate: {best['rate']:,.0f}/s asked, {best['achieved_rate']:,.0f}/s "
            "achieved. Valid means the report's verdict: sends at most 10 ms late at p99 and "
            "at least 95% of the scheduled requests issued (and here ≥ 99% answered 2xx)."
        )
    if best is not None and best is steps[-1]:
        table.notes.append(
            "The highest rate tried was valid: one process may sustain more than this."
        )
    table.notes.append(
        f"Rates rise until {misses} step{'s' if misses > 1 else ''} in a row "
        f"{'are' if misses > 1 else 'is'} not valid; a step not valid is tried once "
        "more and its better try kept. Every try is a fresh generator process; latencies "
        "count from each request's intended send time."
    )
    return table


# -- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: about 30 s in all")
    parser.add_argument("--connections", type=int, default=64, help="C (default 64)")
    parser.add_argument("--duration", type=float, help="seconds per closed run (default 4)")
    parser.add_argument("--repeat", type=int, help="runs per closed row, best kept (default 2)")
    parser.add_argument("--markdown", metavar="PATH", help="write the results section here")
    parser.add_argument("--json", metavar="PATH", help="write every figure here")
    args = parser.parse_args()
    users = args.connections
    seconds = args.duration or (2.0 if args.quick else 4.0)
    repeat = args.repeat or (1 if args.quick else 2)
    step_seconds = 1.5 if args.quick else 3.0
    # 2,000/s steps: up to 10,000/s (--quick) or 20,000/s, until `misses` in a row
    rates = [2000.0 * k for k in range(1, 6 if args.quick else 11)]
    misses = 1 if args.quick else 2  # invalid steps in a row that end the climb
    cores = os.cpu_count() or 1
    wrk = wrk_version()

    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {command}"
    load1, load5, _ = os.getloadavg()
    tools = f"wrk {wrk}" if wrk else "wrk not installed (apt-get install -y wrk): its rows skipped"
    header = [
        f"- Machine: {machine_line()}",
        f"- Load tools: {tools}; aiohttp {version('aiohttp')}",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; load average "
        f"before the run {load1:.2f} (1 min), {load5:.2f} (5 min)",
    ]
    print("\n".join(header) + "\n", flush=True)
    if not wrk:
        print("wrk not found: install it with `apt-get install -y wrk`; its rows are skipped\n")

    tables: list[Table] = []
    raw: dict[str, Any] = {"header": header, "connections": users, "duration_s": seconds}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        folder = Path(tmp)
        for serving in (fast_server, escala_server):
            with serving(folder) as target:
                check(target)
                print(f"{target.name} at {target.url}", flush=True)
                rows = measure_closed(target, users, seconds, repeat, folder, bool(wrk))
                tables.append(closed_table(target, rows, users, seconds, repeat, cores))
                raw[f"closed_{target.key}"] = {"target": asdict(target), "rows": rows}
                if target.key == "fast":
                    steps, best = measure_open(target, rates, step_seconds, misses)
                    tables.append(open_table(target, steps, best, step_seconds, misses))
                    raw["open_fast"] = {"steps": steps, "highest_valid": best}
    took = time.perf_counter() - started
    tables[0].notes += [
        f"{cores} cores here, shared by the client and the server (and anything else "
        "running): a client that takes a core leaves the server the other one. The fastest "
        "pair measures what both can do together on this machine, not the server's capacity.",
        "client CPU = CPU seconds of the client process and its reaped children over its "
        "wall time (wrk: RUSAGE_CHILDREN around it; Python clients: measured inside a fresh "
        "spawned process, imports excluded, escala's own pool start included); server CPU "
        "= the server's processes (psutil); rest of machine = all busy CPU minus those two: "
        "the kernel's work outside them (loopback networking in interrupts) and any other "
        "process. 'ran out of' says client CPU when a client process used ≥ 0.85 core, "
        "server CPU when the server did, else the machine's cores when all were ≥ 85% busy.",
    ]
    for table in tables:
        show(table)
    print(f"took {took:.0f} s")
    raw["took_s"] = took
    if args.markdown:
        text = markdown(tables, header).replace("## Results", f"## {TITLE}", 1)
        text = text.split("### Targets")[0].rstrip() + "\n"  # no targets in this issue
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    warn_stray_children()


if __name__ == "__main__":
    main()
