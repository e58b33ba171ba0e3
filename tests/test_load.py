"""escala.load against a tiny HTTP server whose misbehaviour the tests choose.

The server runs in its own process on 127.0.0.1 (so that it never shares the generator's
GIL) and answers by path: at once, with a chosen status, never, by closing the connection,
or with a stall: requests on a ``/stall/...`` path take 5 ms, except that from one second
after the first request on that path until two seconds after it, every request waits until
the stall ends.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

import escala
from escala import load
from escala.load._open import schedule
from escala.load._record import Recorder

SERVER = textwrap.dedent(
    """
    import asyncio, itertools, sys

    first = {}          # path -> loop time of its first request
    mix = itertools.cycle([200, 429, 503, 500])
    STALL_FROM, STALL_TO = 1.0, 2.0

    async def answer(path, headers):
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = first.setdefault(path, now)
        if path.startswith("/notify") and start == now:
            print("seen", path, flush=True)
        if path.startswith("/stall"):
            # the stall: a window of server time, during which every request waits
            # until the window closes
            if start + STALL_FROM <= now < start + STALL_TO:
                await asyncio.sleep(start + STALL_TO - now)
            else:
                await asyncio.sleep(0.005)  # its usual service time
            return 200
        if path == "/mix":
            return next(mix)
        if path == "/hang":
            await asyncio.Event().wait()
        if path == "/reset":
            return None
        if path == "/auth":
            return 200 if headers.get("authorization") == "Bearer sesame" else 401
        return 200

    async def handle(reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while True:
                    raw = await reader.readline()
                    if raw in (b"\\r\\n", b"\\n", b""):
                        break
                    name, _, value = raw.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", 0))
                if length:
                    await reader.readexactly(length)
                status = await answer(path, headers)
                if status is None:
                    break
                body = method.encode()
                writer.write(
                    f"HTTP/1.1 {status} X\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n".encode()
                    + body
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    """
)


class TinyServer:
    """The server above in a subprocess; ``lines`` reads what it announces."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.stdout = self.process.stdout
        self.url = f"http://127.0.0.1:{int(self.stdout.readline())}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.stdout.close()


@pytest.fixture(scope="module")
def server() -> Iterator[TinyServer]:
    running = TinyServer()
    try:
        yield running
    finally:
        running.stop()


def spec(url: str, **kwargs: object) -> load.LoadSpec:
    kwargs.setdefault("processes", 1)
    return load.LoadSpec(url=url, **kwargs)  # type: ignore[arg-type]


# -- the stall: what the open model shows and the closed model hides ----------------------


@pytest.fixture(scope="module")
def stalled(server: TinyServer) -> tuple[load.LoadReport, load.LoadReport]:
    """The open model at 200/s and the closed one with 4 users, each through its own stall."""
    opened = load.run(spec(server.url + "/stall/open", rate=200, duration=3))
    closed = load.run(spec(server.url + "/stall/closed", users=4, duration=3))
    return opened, closed


def per_second(report: load.LoadReport) -> list[int]:
    return [second.counts["sent"] for second in report.timeline()]


def share_above(histogram: load.Histogram, seconds: float) -> float:
    """The share of the latencies above ``seconds``, read from the spectrum."""
    below = max((p for p, v in histogram.spectrum() if v <= seconds), default=0.0)
    return 1 - below / 100


def test_the_open_model_shows_a_stall_in_its_tail(
    stalled: tuple[load.LoadReport, load.LoadReport],
) -> None:
    opened, _ = stalled
    assert opened.sent == 600 and opened.outcomes[load.Verdict.OK] == 600
    # the requests due during the stall second waited for its end: from their intended
    # times, 0 to 1 s each, about a third of all
    assert opened.ok.percentile(99) >= 0.5
    assert opened.ok.percentile(50) < 0.1
    assert 0.2 < share_above(opened.ok, 0.05) < 0.45
    # and the schedule kept going through the stall: 200 sends in every second
    assert per_second(opened) == [200, 200, 200]


def test_the_closed_model_hides_the_same_stall(
    stalled: tuple[load.LoadReport, load.LoadReport],
) -> None:
    opened, closed = stalled
    # why it hides it: during the stall second the users were all waiting, so they sent
    # almost nothing (one request each, and those sent in the few milliseconds before
    # the server's stall began), while the open model kept sending
    open_seconds, closed_seconds = per_second(opened), per_second(closed)
    assert closed_seconds[1] * 10 < closed_seconds[0]
    assert closed_seconds[1] * 4 < open_seconds[1]
    # and so the stall is one slow request per user among the fast ones: the percentiles
    # look fine, only the max shows it
    assert closed.ok.percentile(99) < 0.1
    assert share_above(closed.ok, 0.05) < 0.02
    assert closed.ok.max >= 0.5


# -- outcomes ------------------------------------------------------------------------------


def test_outcomes_are_counted_by_class(server: TinyServer) -> None:
    report = load.run(spec(server.url + "/mix", rate=400, duration=5, requests=40))
    counts = {outcome.key: n for outcome, n in report.outcomes.items()}
    assert counts == {
        "2xx": 10,
        "429": 10,
        "503": 10,
        "other": 10,
        "timeout": 0,
        "connection_error": 0,
    }
    assert report.other_statuses == {500: 10}
    assert report.ok.count == 10 and report.rejected.count == 20
    assert report.sent == 40 and report.dropped == 0 and report.unfinished == 0


def test_requests_over_the_in_flight_cap_are_dropped_not_delayed(server: TinyServer) -> None:
    report = load.run(spec(server.url + "/hang", rate=100, duration=1, max_inflight=5, timeout=0.5))
    # five in flight, never answered: they time out after 0.5 s, five more go, and every
    # other request due meanwhile is dropped, not sent late
    assert report.sent + report.dropped == 100
    assert report.dropped >= 50
    assert report.outcomes[load.Verdict.TIMEOUT] == report.sent
    assert report.recorder.errors["timeout"] == "no complete answer within 0.5 s"
    assert sum(second.counts["dropped"] for second in report.timeline()) == report.dropped
    assert report.unfinished == 0


def test_connection_errors_are_counted_with_their_reason(server: TinyServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed at once: nothing listens there
    refused = load.run(spec(f"http://127.0.0.1:{port}/", rate=40, duration=0.5))
    assert refused.outcomes[load.Verdict.CONNECTION] == refused.sent == 20
    assert refused.recorder.errors["connection_error"] == "connection refused"
    reset = load.run(spec(server.url + "/reset", rate=40, duration=0.5))
    assert reset.outcomes[load.Verdict.CONNECTION] == reset.sent == 20


def test_the_closed_model_keeps_its_think_time_and_bounds(server: TinyServer) -> None:
    report = load.run(spec(server.url + "/", users=2, think=0.2, duration=0.5))
    # each user: a request, 0.2 s of thought, ... and no request starts after 0.5 s
    assert 2 <= report.sent <= 6
    assert report.outcomes[load.Verdict.OK] == report.sent
    capped = load.run(spec(server.url + "/", users=3, duration=5, requests=30))
    assert capped.sent == 30


def test_a_request_has_its_method_headers_and_body(server: TinyServer) -> None:
    good = load.run(
        spec(
            server.url + "/auth",
            rate=50,
            duration=0.2,
            headers=(("Authorization", "Bearer sesame"),),
        )
    )
    assert good.outcomes[load.Verdict.OK] == good.sent == 10
    bad = load.run(spec(server.url + "/auth", rate=50, duration=0.2, body=b"{}"))
    assert bad.spec.method == "POST"
    assert bad.other_statuses == {401: 10}


# -- the generator judges itself -----------------------------------------------------------


def _busy(seconds: float) -> None:
    """Hold the event loop, as a generator starved of CPU would."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def test_a_generator_that_falls_behind_says_the_run_is_not_valid(server: TinyServer) -> None:
    async def blocked(after: float, seconds: float, run: load.LoadSpec) -> load.LoadReport:
        asyncio.get_running_loop().call_later(after, _busy, seconds)
        return await load.arun(run)

    # the loop held for 0.3 s: the sends due then leave late
    late = asyncio.run(blocked(0.3, 0.3, spec(server.url + "/", rate=200, duration=1)))
    assert not late.valid
    assert "late at p99" in late.problems[0]
    assert late.lag.percentile(99) >= 0.1
    # held for longer than the run and its grace: the rest of the schedule is never sent
    gave_up = asyncio.run(blocked(0.1, 1.6, spec(server.url + "/", rate=200, duration=0.5)))
    assert gave_up.recorder.missed > 0
    assert any("of the 200.0/s scheduled" in problem for problem in gave_up.problems)
    assert gave_up.to_json()["valid"] is False
    # and one left alone keeps up
    fine = load.run(spec(server.url + "/", rate=100, duration=0.5))
    assert fine.lag.count == fine.sent == 50


# -- histograms and processes ---------------------------------------------------------------


def _recorded(values: list[float]) -> bytes:
    histogram = load.Histogram()
    for value in values:
        histogram.record(value)
    return histogram.encode()


def test_histograms_merge_across_processes_without_loss() -> None:
    values = [1e-6 * 10 ** ((k * 37 % 600) / 100) for k in range(5000)]  # 1 µs to 1 s
    halves = [values[0::2], values[1::2]]
    parts = escala.map(_recorded, halves, mode="processes", workers=2)
    merged = load.Histogram.merged([load.Histogram.decode(part) for part in parts])
    single = load.Histogram.decode(_recorded(values))
    assert merged == single
    assert merged.count == 5000
    for percent in (50, 90, 99, 99.9, 100):
        assert merged.percentile(percent) == single.percentile(percent)


def test_recorders_travel_and_add_up() -> None:
    one, two = Recorder(2.0), Recorder(2.0)
    for recorder, at in ((one, 0.5), (two, 1.5)):
        recorder.on_send(at, at)
        recorder.on_answer(at, at + 0.01, load.Verdict.OK, 0.01)
    total = Recorder(2.0)
    for recorder in (one, two):
        total.add(pickle.loads(pickle.dumps(recorder)))
    assert total.sent == 2 and total.ok.count == 2
    assert [row[load.Verdict.OK] for row in total.timeline] == [1, 1]
    assert set(total.timeline_ok) == {0, 1}


def test_several_processes_share_the_rate_and_merge(server: TinyServer) -> None:
    report = load.run(spec(server.url + "/", rate=200, duration=1, processes=2))
    assert report.processes == 2
    assert report.sent == 200 and report.outcomes[load.Verdict.OK] == 200
    assert report.ok.count == 200 and report.lag.count == 200
    assert per_second(report) == [200]


# -- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("2.5", 2.5), (" 1S ", 1.0)],
)
def test_durations_are_read_with_their_unit(text: str, seconds: float) -> None:
    assert load.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "", "5 minutes", "-1s", "0s", "1e3"])
def test_a_duration_that_cannot_be_read_says_the_accepted_forms(text: str) -> None:
    with pytest.raises(load.LoadError, match=r"500ms|above 0"):
        load.parse_duration(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "ftp://x/"}, "malformed URL"),
        ({"url": "http:///path"}, "malformed URL"),
        ({"url": "http://127.0.0.1:99999/"}, "malformed URL"),
        ({"rate": 0}, "--rate must be above 0"),
        ({"rate": -3}, "--rate must be above 0"),
        ({"rate": 5, "users": 5}, "not both"),
        ({"users": 0}, "--users must be 1 or more"),
        ({"duration": 7200}, "at most 1h"),
        ({"arrivals": "bursty"}, "constant, poisson"),
        ({"method": "GE T"}, "HTTP method"),
        ({"headers": (("Bad Name", "x"),)}, "Name: value"),
    ],
)
def test_a_bad_spec_is_refused_with_what_to_do(kwargs: dict[str, object], message: str) -> None:
    kwargs.setdefault("url", "http://127.0.0.1:8000/")
    with pytest.raises(load.LoadError, match=message):
        load.LoadSpec(**kwargs)  # type: ignore[arg-type]


def test_without_rate_or_users_one_user_sends() -> None:
    made = load.LoadSpec(url="http://127.0.0.1:8000/")
    assert made.model is load.Model.CLOSED and made.users == 1 and made.method == "GET"


def test_a_remote_target_needs_to_be_allowed() -> None:
    remote = load.LoadSpec(url="http://192.0.2.1/", rate=1)
    with pytest.raises(load.LoadError, match="--allow-remote"):
        load.run(remote)


def test_poisson_arrivals_repeat_with_a_seed_and_keep_the_rate() -> None:
    poisson = load.LoadSpec(url="http://127.0.0.1:8000/", rate=100, arrivals=load.Arrivals.POISSON)
    first = list(itertools.islice(schedule(poisson, seed=7), 20_000))
    assert first == list(itertools.islice(schedule(poisson, seed=7), 20_000))
    assert first != list(itertools.islice(schedule(poisson, seed=8), 20_000))
    assert first[-1] / len(first) == pytest.approx(0.01, rel=0.05)
    constant = list(itertools.islice(schedule(load.LoadSpec(url=poisson.url, rate=4)), 4))
    assert constant == [0.0, 0.25, 0.5, 0.75]


# -- Ctrl-C ---------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"])
def test_ctrl_c_prints_the_partial_report(server: TinyServer, processes: str) -> None:
    url = f"{server.url}/notify/{processes}"
    command = [sys.executable, "-m", "escala.cli", "load", url, "--rate", "50"]
    running = subprocess.Popen(
        [*command, "--duration", "60s", "--processes", processes],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "120"},
    )
    try:
        # the server says when the first request arrives: the run is under way
        assert server.stdout.readline().strip() == f"seen /notify/{processes}"
        running.send_signal(signal.SIGINT)
        out, err = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    assert running.returncode == 130, err
    assert "INTERRUPTED" in out
    assert "Traceback" not in err
