"""escala demo --service, run as a user would: real servers, real load, tables, a chart.

The figures are checked for behaviour that holds by a wide margin on any machine (many
requests at once serve more per second than one at a time; CPU work on the event loop
makes the loop late; admission control refuses and keeps latency down), never for speed.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

ENV = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}


def demo(cwd: pathlib.Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "escala.cli", "demo", "--service", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_service_demo_shows_three_lessons_and_leaves_nothing(tmp_path: pathlib.Path) -> None:
    running = demo(tmp_path, "--scale", "0.3", "--json", "demo.json", "--chart", "demo.png")
    out, err = running.communicate(timeout=140)
    assert running.returncode == 0, out + err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, "a line is wider than the terminal"
    for title in ("(a) I/O-bound", "(b) CPU-bound", "(c) Overload"):
        assert title in out
    assert sum(line.startswith("→ ") for line in lines) == 3  # a lesson under each table
    assert "Chart saved to" in out and "Results written to" in out
    flowing = " ".join(out.split())  # rich wraps at 80 columns wherever the pids end
    assert "have exited" in flowing
    assert "no thread or child process is left running" in flowing

    report = json.loads((tmp_path / "demo.json").read_text())
    one, together = report["simultaneous"]["runs"]
    assert together["throughput"] > 2 * one["throughput"]
    assert one["failed"] == together["failed"] == 0

    pool, loop = report["offload"]["placements"]
    assert (pool["task"], loop["task"]) == ("fib", "fib_on_loop")
    assert pool["failed"] == loop["failed"] == 0
    # on the loop, each call holds it for its whole duration: the probes see it, and
    # so does every request that arrives meanwhile
    assert loop["lag_late_share"] > pool["lag_late_share"]
    assert loop["lag_mean_ms"] > pool["lag_mean_ms"]
    assert loop["health_p99_ms"] > pool["health_p99_ms"]

    on, off = report["overload"]["servers"]
    assert (on["admission"], off["admission"]) == (True, False)
    assert on["refused_503"] > 0 and on["ok"] > 0
    assert off["refused_503"] == off["refused_429"] == 0
    assert off["p99_ms"] > on["p99_ms"]
    for section in ("simultaneous", "offload", "overload"):
        assert report[section]["lesson"]

    chart = (tmp_path / "demo.png").read_bytes()
    assert chart[:4] == b"\x89PNG" and len(chart) > 10_000
    assert len(report["servers"]) == 3
    for pid in report["servers"]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).ppid() != running.pid


def _first_server(parent: int, deadline: float) -> psutil.Process:
    """Return the demo's first escala serve process, once it runs."""
    while time.monotonic() < deadline:
        for child in psutil.Process(parent).children():
            try:
                if "serve" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        # nothing to wait on for "another program has started a process": poll, bounded
        time.sleep(0.05)
    raise AssertionError("the demo started no server")


def test_ctrl_c_stops_the_servers_and_exits_130(tmp_path: pathlib.Path) -> None:
    running = demo(tmp_path, "--no-chart")
    try:
        server = _first_server(running.pid, time.monotonic() + 60)
        running.send_signal(signal.SIGINT)
        out, err = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    assert running.returncode == 130, out + err
    assert "interrupted" in err
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE


def test_service_demo_refuses_workloads(tmp_path: pathlib.Path) -> None:
    running = demo(tmp_path, "--workloads", "trivial")
    _, err = running.communicate(timeout=60)
    assert running.returncode == 2
    assert "--workloads chooses the workloads of the demo without --service" in err
