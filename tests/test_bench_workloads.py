"""The built-in workloads: the registry, each workload's contract, and a clean tear-down."""

from __future__ import annotations

import inspect
import json
import pickle
import socket
import sys
import threading
import urllib.error
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

import escala
from escala.bench import workloads

ALL = ["cpu-python", "cpu-nogil", "sleep-io", "http-io", "file-io", "mixed", "trivial"]
SCALE = 0.1


def _module_level(fn: object) -> bool:
    """Whether ``fn`` is found again by its module and name, as pickle finds it."""
    module = sys.modules[fn.__module__]  # type: ignore[attr-defined]
    return getattr(module, fn.__qualname__, None) is fn  # type: ignore[attr-defined]


def test_registry_lists_the_seven_in_order() -> None:
    assert workloads.names() == ALL


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown workload 'nope'.*cpu-python.*trivial"):
        workloads.get("nope")


@pytest.mark.parametrize("name", ALL)
def test_describes_itself(name: str) -> None:
    workload = workloads.get(name)
    assert isinstance(workload, workloads.Workload)
    assert workload.name == name
    assert workload.title
    assert workload.expected in ("sequential", "threads", "processes")
    assert workload.explanation.endswith(".")


@pytest.mark.parametrize("name", ALL)
def test_runs_like_a_list_comprehension(name: str) -> None:
    with workloads.get(name).prepared(SCALE) as prepared:
        assert isinstance(prepared.items, list) and prepared.items
        assert _module_level(prepared.fn)
        assert pickle.loads(pickle.dumps(prepared.fn)) is prepared.fn  # by reference
        expected = [prepared.fn(item) for item in prepared.items]
        assert escala.map(prepared.fn, prepared.items, mode="sequential") == expected
        if prepared.afn is not None:
            assert inspect.iscoroutinefunction(prepared.afn)
            assert _module_level(prepared.afn)
            assert escala.map(prepared.afn, prepared.items, mode="async") == expected


@pytest.mark.parametrize("name", ALL)
def test_leaves_nothing_running(name: str) -> None:
    threads = set(threading.enumerate())
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with workloads.get(name).prepared(SCALE) as prepared:
        prepared.fn(prepared.items[0])
    assert set(threading.enumerate()) <= threads
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children


def test_scale_sizes_the_work() -> None:
    sleep = workloads.get("sleep-io")
    with sleep.prepared(0.1) as small, sleep.prepared(1.0) as full:
        assert len(small.items) < len(full.items)
    cpu = workloads.get("cpu-python")
    with cpu.prepared(0.1) as small, cpu.prepared(1.0) as full:
        assert max(small.items) < min(full.items)
    with pytest.raises(ValueError, match="scale"), sleep.prepared(0):
        pass


def test_http_server_answers_on_loopback_then_closes() -> None:
    from escala.bench.workloads.http_io import fetch

    with workloads.get("http-io").prepared(SCALE) as prepared:
        url = prepared.items[3]
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1"
        assert all(urlsplit(u).hostname == "127.0.0.1" for u in prepared.items)
        assert fetch(url) == {"item": 3, "ok": True}
        with pytest.raises(urllib.error.HTTPError) as missing:
            fetch(f"http://127.0.0.1:{parts.port}/elsewhere")
        missing.value.close()
        assert missing.value.code == 404
        assert any(t.name == "escala-bench-http" for t in threading.enumerate())
    assert not any(t.name == "escala-bench-http" for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", parts.port), timeout=5).close()


def _raise_inside(workload: object, seen: list[object]) -> None:
    with workload.prepared(SCALE) as prepared:  # type: ignore[attr-defined]
        seen.append(prepared.items[0])
        raise RuntimeError("stop")


def test_http_server_closes_when_the_body_raises() -> None:
    seen: list[object] = []
    with pytest.raises(RuntimeError, match="stop"):
        _raise_inside(workloads.get("http-io"), seen)
    port = urlsplit(str(seen[0])).port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_async_fetch_reads_the_same_body() -> None:
    from escala.bench.workloads.http_io import afetch, fetch

    with workloads.get("http-io").prepared(SCALE) as prepared:
        url = prepared.items[1]
        assert escala.map(afetch, [url], mode="async") == [fetch(url)]
        with pytest.raises(OSError, match="404"):
            escala.map(afetch, [url.replace("/item/", "/other/")], mode="async")
        assert json.dumps(fetch(url))  # plain data: crosses to a process and back


def test_file_io_folder_exists_only_inside() -> None:
    with workloads.get("file-io").prepared(SCALE) as prepared:
        folder = Path(prepared.items[0]).parent
        assert folder.is_dir()
        assert all(Path(item).parent == folder for item in prepared.items)
        assert prepared.fn(prepared.items[0]) == 1 << 20
        assert not Path(prepared.items[0]).exists()  # each task cleans its own file
        Path(prepared.items[1]).write_bytes(b"left over")
    assert not folder.exists()


def test_file_io_folder_removed_when_the_body_raises() -> None:
    seen: list[object] = []
    with pytest.raises(RuntimeError, match="stop"):
        _raise_inside(workloads.get("file-io"), seen)
    assert not Path(str(seen[0])).parent.exists()
