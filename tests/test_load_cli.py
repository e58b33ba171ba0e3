"""``escala load`` as a user runs it, against a real ``escala serve`` on 127.0.0.1."""

from __future__ import annotations

import json
import pathlib
import socket
from collections.abc import Iterator

import pytest

from svc import Server, add_key, escala, serving, write_app


class Target:
    """A running ``escala serve`` with API keys, and one valid key."""

    def __init__(self, server: Server, key: str, folder: pathlib.Path) -> None:
        self.server = server
        self.key = key
        self.folder = folder

    def url(self, path: str) -> str:
        return self.server.url + path


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = write_app(tmp_path_factory.mktemp("load"))
    key = add_key(folder, "loader")
    with serving(folder) as server:
        yield Target(server, key, folder)


def load(cwd: pathlib.Path, *args: str) -> tuple[int, str, str]:
    done = escala(cwd, "load", *args)
    return done.returncode, done.stdout, done.stderr


def test_an_open_run_over_two_processes_adds_up(target: Target, tmp_path: pathlib.Path) -> None:
    code, out, err = load(
        tmp_path,
        target.url("/v1/run/echo"),
        *("-X", "POST", "--token", target.key, "--rate", "100", "--duration", "2s"),
        *("--processes", "2", "--json", "run.json", "--plot", "run.png"),
    )
    assert code == 0, err
    assert "open model, 100/s constant" in out and "2 processes" in out
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["model"] == "open" and report["processes"] == 2
    requests, outcomes = report["requests"], report["outcomes"]
    # every request sent has exactly one outcome; dropped ones were never sent
    assert requests["sent"] == sum(outcomes.values())
    assert requests["sent"] + requests["dropped"] + requests["missed"] == requests["scheduled"]
    assert requests["scheduled"] == 200
    assert outcomes["2xx"] == requests["sent"]
    assert report["latency_ms"]["from"] == "intended send"
    assert report["latency_ms"]["2xx"]["count"] == outcomes["2xx"]
    seconds = report["timeline"]
    assert [s["start_s"] for s in seconds] == [0, 1]
    assert sum(s["sent"] for s in seconds) == requests["sent"]
    assert (tmp_path / "run.png").stat().st_size > 10_000


def test_a_closed_run_says_what_it_hides(target: Target, tmp_path: pathlib.Path) -> None:
    code, out, err = load(
        tmp_path,
        target.url("/v1/run/echo"),
        *("-X", "POST", "--token", target.key, "--users", "3", "--duration", "1s"),
        *("--processes", "1", "--json", "run.json"),
    )
    assert code == 0, err
    assert "closed model, 3 users" in out
    assert "Closed model: each user waits for its answer" in out
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["latency_ms"]["from"] == "actual send"
    assert report["outcomes"]["2xx"] == report["requests"]["sent"] > 3


def test_compare_measures_what_simultaneity_buys(target: Target, tmp_path: pathlib.Path) -> None:
    code, out, err = load(
        tmp_path,
        target.url("/v1/run/nap"),
        *("--token", target.key, "--body", '{"args": [0.05]}'),
        *("--compare", "--count", "20", "--concurrency", "10", "--json", "compare.json"),
    )
    assert code == 0, err
    assert "one after another" in out and "simultaneously" in out
    assert "Speed-up: ×" in out
    assert "Little's law: requests in flight = throughput × time each takes" in out
    figures = json.loads((tmp_path / "compare.json").read_text())
    assert figures["one_by_one"]["outcomes"]["2xx"] == 20
    assert figures["together"]["outcomes"]["2xx"] == 20
    # ten naps of 50 ms at once against one at a time: far more than twice the throughput
    assert figures["speedup"] > 2


def test_a_token_opens_the_door_and_its_absence_is_counted(
    target: Target, tmp_path: pathlib.Path
) -> None:
    url = target.url("/v1/run/echo")
    pacing = ("-X", "POST", "--rate", "20", "--duration", "0.5s", "--processes", "1")
    code, _, err = load(tmp_path, url, *pacing, "--token", target.key, "--json", "yes.json")
    assert code == 0, err
    allowed = json.loads((tmp_path / "yes.json").read_text())
    assert allowed["outcomes"]["2xx"] == allowed["requests"]["sent"] == 10
    code, out, err = load(tmp_path, url, *pacing, "--json", "no.json")
    assert code == 0, err
    refused = json.loads((tmp_path / "no.json").read_text())
    assert refused["outcomes"]["other"] == refused["requests"]["sent"] == 10
    assert refused["other_statuses"] == {"401": 10}
    assert "is --token KEY needed?" in out


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed on leaving: nothing listens there


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("http://127.0.0.1:{port}/", "--rate", "10"), "cannot connect to http://127.0.0.1:"),
        (("htp:/nowhere", "--rate", "10"), "malformed URL 'htp:/nowhere'"),
        (("http://127.0.0.1:{port}/", "--rate", "0"), "--rate must be above 0"),
        (("http://127.0.0.1:{port}/", "--duration", "soon"), "500ms, 30s, 2m or 1h"),
        (("http://127.0.0.1:{port}/", "--users", "many"), "--users must be a whole number"),
        (("http://127.0.0.1:{port}/", "--body", "{oops"), "--body is not valid JSON"),
        (("http://127.0.0.1:{port}/", "--json", "/no/such/dir/r.json"), "cannot write --json"),
    ],
    ids=["unreachable", "malformed", "rate-zero", "duration", "users", "body", "json-path"],
)
def test_bad_input_is_one_line_and_exit_status_2(
    tmp_path: pathlib.Path, args: tuple[str, ...], message: str
) -> None:
    port = _closed_port()
    code, out, err = load(tmp_path, *(arg.replace("{port}", str(port)) for arg in args))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("escala load: "), err
    assert message in err
    assert "Traceback" not in err
