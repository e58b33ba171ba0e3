"""The escala command, run as a user would: a subprocess, a module of their own, files."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest

USER_MODULE = textwrap.dedent(
    """
    import time

    def wait(x):
        time.sleep(0.01)
        return x

    def add(a, b):
        return a + b

    def double(x):
        return 2 * x

    def broken(x):
        raise ValueError(f"cannot handle {x}")

    def inputs():
        return list(range(30))

    NOT_A_FUNCTION = 42
    """
)


@pytest.fixture
def project(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder with the user's own module in it, as the current directory."""
    (tmp_path / "usertasks.py").write_text(USER_MODULE)
    return tmp_path


def escala(cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "escala.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_advise_says_which_mode_and_why(project: pathlib.Path) -> None:
    done = escala(project, "advise", "usertasks:wait", "--range", "200")
    assert done.returncode == 0, done.stderr
    assert "mode=threads" in done.stdout
    assert "this work waits on I/O, so threads were chosen" in done.stdout
    assert "200 items" in done.stdout


def test_bench_compares_modes_and_writes_json_and_a_chart(project: pathlib.Path) -> None:
    done = escala(
        project,
        "bench",
        "usertasks:wait",
        "--range",
        "30",
        "--modes",
        "sequential,threads,auto",
        "--workers",
        "2,8",
        "--json",
        "out.json",
        "--plot",
        "out.png",
    )
    assert done.returncode == 0, done.stderr
    assert "sequential" in done.stdout and "threads" in done.stdout
    assert "auto chose threads" in done.stdout
    results = json.loads((project / "out.json").read_text())
    assert len(results["workloads"]) == 2  # one per worker count of the sweep
    assert [r["mode"] for r in results["workloads"][0]["runs"]] == ["sequential", "threads", "auto"]
    assert (project / "out.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_with_argument_lists_from_a_json_lines_file(project: pathlib.Path) -> None:
    (project / "pairs.jsonl").write_text("[1, 2]\n[3, 4]\n\n[5, 6]\n")
    done = escala(
        project,
        "bench",
        "usertasks:add",
        "--input",
        "pairs.jsonl",
        "--star",
        "--modes",
        "sequential,processes",
    )
    assert done.returncode == 0, done.stderr
    assert "3 items" in done.stdout


def test_items_from_a_function(project: pathlib.Path) -> None:
    done = escala(project, "advise", "usertasks:wait", "--items", "usertasks:inputs")
    assert done.returncode == 0, done.stderr
    assert "30 items" in done.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["advise", "nomodule:fn", "--range", "3"], "cannot import 'nomodule'"),
        (["advise", "usertasks:missing", "--range", "3"], "has no attribute 'missing'"),
        (["advise", "usertasks:NOT_A_FUNCTION", "--range", "3"], "is not callable"),
        (["advise", "usertasks", "--range", "3"], "must look like package.module:function"),
        (["advise", "usertasks:wait"], "give the inputs"),
        (["bench", "usertasks:wait", "--input", "missing.jsonl"], "cannot read --input"),
        (["bench", "usertasks:wait", "--range", "0"], "must be 1 or more"),
        (["bench", "usertasks:wait", "--range", "3", "--modes", "gpu"], "unknown mode 'gpu'"),
        (["demo", "--workloads", "nope"], "unknown workload 'nope'"),
    ],
    ids=[
        "no-module",
        "no-attribute",
        "not-callable",
        "no-colon",
        "no-inputs",
        "unreadable-file",
        "zero-range",
        "unknown-mode",
        "unknown-workload",
    ],
)
def test_mistakes_are_one_clear_line_and_exit_2(
    project: pathlib.Path, args: list[str], words: str
) -> None:
    done = escala(project, *args)
    assert done.returncode == 2
    assert words in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_input_line_is_named(project: pathlib.Path) -> None:
    (project / "items.jsonl").write_text('1\n2\n{"oops": \n4\n')
    done = escala(project, "bench", "usertasks:wait", "--input", "items.jsonl")
    assert done.returncode == 2
    assert "items.jsonl line 3: not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_function_that_raises_on_the_first_item(project: pathlib.Path) -> None:
    for command in ("bench", "advise"):
        done = escala(project, command, "usertasks:broken", "--range", "5")
        assert done.returncode == 1
        assert "raised on the first item (0): ValueError: cannot handle 0" in done.stderr
        assert "Traceback" not in done.stderr


def test_demo_runs_every_mode_and_saves_its_chart(tmp_path: pathlib.Path) -> None:
    done = escala(
        tmp_path,
        "demo",
        "--workloads",
        "trivial,sleep-io,cpu-python",
        "--scale",
        "0.25",
        "--chart",
        "demo.png",
        "--json",
        "demo.json",
    )
    assert done.returncode == 0, done.stderr
    for text in ("cpu-python", "sleep-io", "trivial", "auto→", "What auto chose, and why"):
        assert text in done.stdout
    assert "Chart saved to" in done.stdout
    assert "no thread or child process is left running" in done.stdout
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "demo.json").read_text())
    assert {c["name"] for c in report["workloads"]} == {"trivial", "sleep-io", "cpu-python"}


def test_no_command_shows_the_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "escala.cli"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "demo" in done.stdout and "bench" in done.stdout and "advise" in done.stdout


def test_advise_weighs_a_cluster_at_an_address(project: pathlib.Path, dask_cluster: Any) -> None:
    address = dask_cluster.scheduler.address
    done = escala(project, "advise", "usertasks:double", "--range", "300", "--address", address)
    assert done.returncode == 0, done.stderr
    # trivial tasks: the cluster's cost per task is named, and the work stays here
    assert f"The Dask cluster at {address}" in done.stdout.replace("\n", " ")
    assert "ms per task" in done.stdout and "mode=dask" not in done.stdout


def test_advise_refuses_an_address_of_no_engine(project: pathlib.Path) -> None:
    done = escala(project, "advise", "usertasks:wait", "--range", "3", "--address", "http://x")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--address: cannot tell which engine runs the cluster at 'http://x'" in done.stderr
