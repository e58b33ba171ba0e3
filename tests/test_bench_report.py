"""Showing comparisons: the rich table, the chart, JSON, and the advisor's explanations."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import escala
from escala import bench

ALL = ["cpu-python", "cpu-nogil", "sleep-io", "http-io", "file-io", "mixed", "trivial"]
needs_advise = pytest.mark.skipif(
    not hasattr(escala, "advise"), reason="escala.advise and mode='auto' have not landed yet"
)


def _comparison(name: str, *, advice: object = None) -> object:
    """A made-up comparison: what each mode would show, without running anything."""
    walls = {"sequential": 0.8, "threads": 0.2, "processes": 0.45, "async": 0.05}
    runs = [
        bench.RunResult(name, mode, workers, wall, wall / 2, 60 << 20, True)
        for (mode, wall), workers in zip(walls.items(), (1, 6, 2, 100), strict=True)
    ]
    if name == "cpu-python":
        runs[3] = bench.RunResult(name, "async", 0, 0.0, 0.0, None, False, skipped="no async form")
    if name == "file-io":
        runs[2] = bench.RunResult(
            name, "processes", 2, 0.1, 0.0, 50 << 20, False, error="WorkerDied: killed"
        )
    if advice is not None:
        runs.append(bench.RunResult(name, "auto", 6, 0.21, 0.1, 61 << 20, True, advice=advice))
    workload = bench.workloads.get(name)
    return bench.Comparison(
        name, workload.title, workload.expected, workload.explanation, 2, 1.0, tuple(runs)
    )


def _advice() -> object:
    from escala.advisor._advice import Advice, Reason

    return Advice(mode="threads", workers=6, batch=1, speedup=4.0, reason=Reason.WAITS)


def test_table_shows_every_workload_and_mode() -> None:
    comparisons = [_comparison(name, advice=_advice()) for name in ALL]
    console = Console(record=True, width=160)
    console.print(bench.table(comparisons))
    text = console.export_text()
    for name in ALL:
        assert name in text
    for mode in ("sequential", "threads", "processes", "async", "auto"):
        assert mode in text
    assert "2 usable cores" in text
    assert "auto→threads" in text  # the auto row names the mode it chose
    assert "no async form" in text  # the caption says what a dash means
    assert "failed" in text and "WorkerDied: killed" in text
    starred = [line for line in text.splitlines() if "★" in line and "fastest" not in line]
    # async, the quickest here, is marked, except where it was skipped: then threads is.
    assert sum("async ★" in line for line in starred) == len(ALL) - 1
    assert sum("threads ★" in line for line in starred) == 1
    assert "16.00×" in text or "16×" in text  # 0.8 s / 0.05 s


def test_chart_is_a_png(tmp_path: Path) -> None:
    comparisons = [_comparison(name, advice=_advice()) for name in ALL]
    path = bench.save_chart(comparisons, tmp_path / "modes.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 600)


def test_chart_needs_something_to_draw(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no comparisons"):
        bench.save_chart([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_json_holds_every_run() -> None:
    comparisons = [_comparison(name) for name in ALL]
    data = json.loads(json.dumps(bench.to_json(comparisons)))
    assert data["machine"]["cores"] == 2
    assert [w["name"] for w in data["workloads"]] == ALL
    cpu = data["workloads"][0]
    assert cpu["fastest"] == "threads"  # async was skipped there
    assert [r["status"] for r in cpu["runs"]] == ["ok", "ok", "ok", "skipped"]
    assert cpu["runs"][1]["speedup"] == pytest.approx(4.0)
    failed = data["workloads"][ALL.index("file-io")]["runs"][2]
    assert (failed["status"], failed["error"], failed["speedup"]) == (
        "failed",
        "WorkerDied: killed",
        None,
    )


def test_no_explanations_without_auto() -> None:
    assert bench.explanations([_comparison("mixed")]) == []


@needs_advise
def test_explanations_come_from_the_advice() -> None:
    advice = _advice()
    lines = bench.explanations([_comparison("mixed", advice=advice)])
    assert lines == [f"Compute 3 ms, wait 20 ms (mixed): {advice.explain()}"]
    data = bench.to_json([_comparison("mixed", advice=advice)])
    assert data["workloads"][0]["runs"][-1]["advice"]["mode"] == "threads"


def test_importing_bench_leaves_matplotlib_alone() -> None:
    code = "import sys, escala.bench; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_real_comparison_renders(tmp_path: Path) -> None:
    comparison = bench.compare("trivial", ("sequential", "threads"), scale=0.05)
    console = Console(record=True, width=160)
    console.print(bench.table([comparison]))
    assert "trivial" in console.export_text()
    assert bench.save_chart([comparison], tmp_path / "one.png").stat().st_size > 10_000
