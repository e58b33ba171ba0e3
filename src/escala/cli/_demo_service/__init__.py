"""``escala demo --service``: escala serve under load, three lessons measured on this machine.

Every figure comes from this run: real servers on 127.0.0.1, real requests from
:mod:`escala.load`, the server's own loop-lag histogram from ``/metrics``::

    this process                                   escala serve subprocesses, 127.0.0.1
    ────────────                                   ────────────────────────────────────
    (a) load.compare: nap, 1 then 20 at a time ──▶ server 1 (defaults)
    (b) load.arun ×2 on one loop, open model:       │ fib: in its process pool
          /v1/run/fib, then /v1/run/fib_on_loop ──▶ │ fib_on_loop: on its event loop
          /healthz at the same time                 │ /metrics read before and after
    (c) load.run, open model at 3× capacity    ──▶ server 2 (--io-limit 8 --max-inflight 8)
                                               ──▶ server 3 (the same, --no-admission)
        │
        ▼
    _show.py: figures ──▶ three tables with a lesson each, one chart, JSON

Each server is a subprocess stopped by its own pid (SIGTERM, then kill), in ``finally``
blocks, so that an error or Ctrl-C leaves nothing running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._common import TaskFailed, UsageError
from . import _show as show
from ._chart import save_chart
from ._figures import (
    CALL_TARGET,
    CONCURRENCY,
    CPU_SHARE,
    HEALTH_RATE,
    IO_LIMIT,
    NAP,
    OVERLOAD,
    OVERLOAD_NAP,
    TIMEOUT,
    LoopLag,
    OffloadPhase,
    OverloadPhase,
    Results,
)

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from ...load import Comparison, LoadProgress, LoadReport, LoadSpec

__all__ = ["LoopLag", "OffloadPhase", "OverloadPhase", "Results", "run"]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0


def run(args: argparse.Namespace, *, machine: str, leftovers: Callable[[], str]) -> int:
    """Run the service demo as the ``escala demo --service`` command; return the status.

    Args:
        args: ``scale``, ``chart``, ``no_chart`` and ``json`` of the demo command.
        machine: a line that says what this machine is.
        leftovers: says what this process left running (threads, child processes).

    Raises:
        UsageError: the serve or load extra is missing.
        TaskFailed: a server did not start or stopped on its own.
    """
    try:
        import aiohttp  # noqa: F401
        import fastapi  # noqa: F401
        import hdrh  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"escala demo --service needs {exc.name}: pip install 'escala[serve,load,demo]'"
        ) from None
    from rich.console import Console

    console = Console()
    console.print(f"[bold]escala demo --service[/bold] · {machine}")
    console.print(
        "escala serve runs on 127.0.0.1 with its example tasks; escala load sends the "
        "requests. Every figure below is measured now, on this machine.\n"
    )
    started = time.perf_counter()
    results = Results(scale=args.scale, machine=machine)
    with (
        tempfile.TemporaryDirectory(prefix="escala-demo-") as folder,
        console.status("starting escala serve…") as status,
    ):
        fleet = _Fleet(Path(folder), results.servers)
        try:
            _demonstrate(results, fleet, lambda what: status.update(what), console)
        finally:
            fleet.stop_all()
    chart = None if args.no_chart else (args.chart or "escala-demo-service.png")
    _outputs(console, results, args.json, chart)
    gone = _gone(results.servers)
    console.print(
        f"\nDone in {time.perf_counter() - started:.1f} s; the {len(results.servers)} "
        f"servers (pids {', '.join(map(str, results.servers))}) {gone}; {leftovers()}."
    )
    return 0


def _demonstrate(
    results: Results, fleet: _Fleet, say: Callable[[RenderableType], None], console: Console
) -> None:
    """Run the three scenarios, printing each table as soon as it is measured."""
    from ...load import _show as load_show

    def progress(label: str) -> Callable[[LoadProgress], None]:
        return lambda where: say(load_show.progress_line(where, label))

    server = fleet.start("main", ())
    say("(a) the same requests one after another, then simultaneously…")
    results.simultaneous = _simultaneous(server.url, results.scale, progress)
    console.print(show.simultaneous_view(results))
    say("(b) choosing fib's size so that one call takes about 20 ms…")
    _calibrate(results, server.url)
    _offload(results, server.url, progress)
    console.print(show.offload_view(results))
    fleet.stop(server)
    results.overload_duration = max(2.0, 6.0 * results.scale)
    for admission in (True, False):
        options = ["--io-limit", str(IO_LIMIT), "--max-inflight", str(IO_LIMIT)]
        name = "admission" if admission else "no-admission"
        say(f"(c) starting a server with {name.replace('-', ' ')} control…")
        server = fleet.start(name, options if admission else [*options, "--no-admission"])
        report = _overload(server.url, results.overload_duration, progress(f"(c) {name}"))
        results.overload.append(OverloadPhase(admission, report))
        fleet.stop(server)
    console.print(show.overload_view(results))


# -- the scenarios ----------------------------------------------------------------------


def _spec(url: str, args: Sequence[Any] | None = None, **pacing: Any) -> LoadSpec:
    from ...load import LoadSpec

    body = None if args is None else json.dumps({"args": list(args)}).encode()
    return LoadSpec(url=url, body=body, **pacing)


def _checked(report: LoadReport) -> LoadReport:
    # the load generator turns Ctrl-C into a partial report; here it ends the demo
    if report.interrupted:
        raise KeyboardInterrupt
    return report


def _simultaneous(
    url: str, scale: float, progress: Callable[[str], Callable[[LoadProgress], None]]
) -> Comparison:
    """(a) ``compare``: the same naps one after another, then CONCURRENCY at a time."""
    from ...load import compare

    count = max(CONCURRENCY, round(60 * scale))
    # a bound that one-after-another keeps on any machine that is not at a standstill
    bound = max(10.0, 4 * count * NAP)
    spec = _spec(f"{url}/v1/run/nap", [NAP], timeout=TIMEOUT, duration=bound)
    comparison = compare(
        spec,
        count=count,
        concurrency=CONCURRENCY,
        progress=lambda name, where: progress(f"(a) {name}")(where),
    )
    if comparison.interrupted:
        raise KeyboardInterrupt
    return comparison


def _calibrate(results: Results, url: str) -> None:
    """Choose n so that one fib(n) takes about CALL_TARGET on the server itself.

    Timed by the server (``duration_ms`` of the answer) on its event loop, where nothing
    else runs: the same call in the pool takes as long plus a hand-over.
    """
    for n in range(18, 33):
        # the fastest of three: another process that takes the core shows as a slow call
        timings = [_post(f"{url}/v1/run/fib_on_loop", {"args": [n]}) for _ in range(3)]
        seconds = min(float(t["duration_ms"]) for t in timings) / 1e3
        if seconds >= CALL_TARGET or n == 32:
            break
    results.fib_n, results.call_seconds = n, seconds
    workers = _get_json(f"{url}/v1/stats")["workers"]["cpu"]
    results.cpu_workers = int(workers)


def _offload(
    results: Results, url: str, progress: Callable[[str], Callable[[LoadProgress], None]]
) -> None:
    """(b) the same CPU task, in the process pool and then on the loop, under one load.

    Both phases run on the same server, one after the other: the same process, warm, with
    the same pool, so that where the work runs is the only difference. The loop lag of a
    phase is the difference of the server's histogram read before and after it.
    """
    from ...load import arun

    n = results.fib_n
    # 40% of one core at most: both placements keep up, and only the loop's share differs
    rate = max(2.0, min(100.0, CPU_SHARE / results.call_seconds))
    duration = max(2.0, 5.0 * results.scale)
    results.offload_rate, results.offload_duration = rate, duration
    for task, runs_on in (("fib", "process pool"), ("fib_on_loop", "event loop")):
        for _ in range(3):  # warm: the pool's worker has imported the task
            _post(f"{url}/v1/run/{task}", {"args": [n]})
        work = _spec(f"{url}/v1/run/{task}", [n], rate=rate, duration=duration, timeout=10.0)
        health = _spec(f"{url}/healthz", rate=HEALTH_RATE, duration=duration, timeout=10.0)
        before = _lag_buckets(url)

        async def both() -> tuple[LoadReport, LoadReport]:
            shown = progress(f"(b) {task} + /healthz")
            loaded, probed = await asyncio.gather(arun(work, progress=shown), arun(health))
            return loaded, probed

        loaded, probed = asyncio.run(both())
        lag = _lag_between(before, _lag_buckets(url))
        results.offload.append(OffloadPhase(task, runs_on, loaded, probed, lag))


def _overload(url: str, duration: float, progress: Callable[[LoadProgress], None]) -> LoadReport:
    """(c) naps offered at OVERLOAD × capacity, open model, for ``duration`` seconds."""
    from ...load import run as load

    capacity = IO_LIMIT / OVERLOAD_NAP
    spec = _spec(
        f"{url}/v1/run/nap",
        [OVERLOAD_NAP],
        rate=OVERLOAD * capacity,
        duration=duration,
        timeout=TIMEOUT,
        processes=1,
        max_inflight=math.ceil(OVERLOAD * capacity * (TIMEOUT + 1)),
    )
    _post(f"{url}/v1/run/nap", {"args": [0]})  # the first request pays for imports
    return _checked(load(spec, progress=progress))


# -- the server's own figures -----------------------------------------------------------

_BUCKET = re.compile(r'^escala_loop_lag_seconds_bucket\{le="([^"]+)"\}\s+(\S+)$', re.M)
_TOTAL = re.compile(r"^escala_loop_lag_seconds_(count|sum)\s+(\S+)$", re.M)


def _lag_buckets(url: str) -> dict[str, float]:
    """Return the loop-lag histogram: cumulative count per bucket edge, count and sum."""
    text = _get(f"{url}/metrics").decode()
    found = {edge: float(count) for edge, count in _BUCKET.findall(text)}
    found.update({f"_{name}": float(value) for name, value in _TOTAL.findall(text)})
    return found


def _lag_between(before: dict[str, float], after: dict[str, float]) -> LoopLag:
    """Return the loop lag of the samples taken between two reads of the histogram."""
    edges = sorted(
        (float(edge), round(after[edge] - before.get(edge, 0.0)))
        for edge in after
        if not edge.startswith("_")
    )
    count = round(after.get("_count", 0.0) - before.get("_count", 0.0))
    total = after.get("_sum", 0.0) - before.get("_sum", 0.0)
    return LoopLag(
        probes=count,
        mean=total / count if count else 0.0,
        p99=_bucket_of(edges, math.ceil(0.99 * count)),
        max=_bucket_of(edges, count),
        buckets=dict(edges),
    )


def _bucket_of(edges: Sequence[tuple[float, int]], rank: int) -> tuple[float, float]:
    """Return the (lower, upper) edges of the bucket that holds the rank-th smallest sample."""
    lower = 0.0
    for upper, cumulative in edges:
        if cumulative >= rank:
            return lower, upper
        lower = upper
    return lower, math.inf


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        data: bytes = answer.read()
    return data


def _get_json(url: str) -> Any:
    return json.loads(_get(url))


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


# -- the servers ------------------------------------------------------------------------


class _Server:
    """``escala serve`` of the example tasks in a subprocess, on a free loopback port."""

    def __init__(self, folder: Path, name: str, options: Sequence[str]) -> None:
        self.name = name
        self.log: list[str] = []
        self.url = ""
        self._announced = threading.Event()
        command = [
            sys.executable, "-m", "escala.cli", "serve",
            "--app", "escala.service.examples", "--no-auth",
            "--host", "127.0.0.1", "--port", "0",
            "--db", str(folder / f"{name}.db"),
            "--grace", "1",  # a demo server has nothing worth waiting for at the end
            *options,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        # reads until the server exits, so that its stderr pipe never fills up and blocks it
        self._reader = threading.Thread(target=self._drain, name=f"demo-{name}-log", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                self._announced.set()
        self._announced.set()

    def wait_ready(self) -> None:
        """Wait for the announced URL.

        Raises:
            TaskFailed: the server ended, or said nothing in time.
        """
        if not self._announced.wait(_START_TIMEOUT) or not self.url:
            said = "".join(self.log[-5:]).strip() or "nothing"
            raise TaskFailed(f"escala serve ({self.name}) did not start; it said: {said}")

    def stop(self) -> None:
        """SIGTERM, as an orchestrator would; kill it if it has not ended in time."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        except KeyboardInterrupt:
            # a second Ctrl-C while waiting: stop it at once, then stop as asked
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._reader.join(_STOP_TIMEOUT)
            if self.process.stderr is not None:
                self.process.stderr.close()


class _Fleet:
    """The servers of one demo, each stopped by its own pid, all of them in the end."""

    def __init__(self, folder: Path, pids: list[int]) -> None:
        self._folder = folder
        self._running: list[_Server] = []
        self._pids = pids

    def start(self, name: str, options: Sequence[str]) -> _Server:
        # A Ctrl-C between the fork and the registration below would orphan the server:
        # stop_all() could not know it. Hold the interrupt until it is registered.
        held: list[int] = []
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda n, _: held.append(n)) if main else None
        try:
            server = _Server(self._folder, name, options)
            self._running.append(server)
            self._pids.append(server.pid)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        if held:
            raise KeyboardInterrupt
        server.wait_ready()
        return server

    def stop(self, server: _Server) -> None:
        self._running.remove(server)
        server.stop()

    def stop_all(self) -> None:
        while self._running:
            self.stop(self._running[-1])


def _gone(pids: Sequence[int]) -> str:
    """Say whether the processes with these pids have ended (checked, not assumed)."""
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]
    except ImportError:  # pragma: no cover - psutil comes with escala[demo]
        return "were stopped"
    children = {child.pid for child in psutil.Process().children(recursive=True)}
    alive = [pid for pid in pids if pid in children]
    return "have exited" if not alive else f"are STILL RUNNING: {alive}"


def _outputs(console: Any, results: Results, json_path: str | None, chart: str | None) -> None:
    """Write the JSON and the chart, if asked, and say where."""
    if json_path:
        try:
            Path(json_path).write_text(json.dumps(show.to_json(results), indent=2) + "\n")
        except OSError as exc:
            console.print(f"\nCannot write --json {json_path!r}: {exc.strerror or exc}")
        else:
            console.print(f"\nResults written to [bold]{json_path}[/bold]")
    if chart:
        try:
            saved = save_chart(results, chart)
        except ImportError:
            console.print("\nThe chart needs matplotlib: pip install 'escala[demo]'")
        else:
            console.print(f"\nChart saved to [bold]{saved.resolve()}[/bold]")
