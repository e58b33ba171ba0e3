"""Usable cores from affinity and cgroup quotas; native thread pools capped in workers."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import escala
from escala._worker.cpu import NATIVE_THREAD_VARS, cgroup_cpu_quota, usable_cpus


def _cgroup_v2(root: pathlib.Path, cpu_max: str, nested: str | None = None) -> pathlib.Path:
    """Lay out a fake cgroup v2 tree with this process in ``/app/worker``."""
    leaf = root / "app" / "worker"
    leaf.mkdir(parents=True, exist_ok=True)
    (root / "app" / "cpu.max").write_text(cpu_max)
    if nested is not None:
        (leaf / "cpu.max").write_text(nested)
    membership = root / "self-cgroup"
    membership.write_text("0::/app/worker\n")
    return membership


def test_cgroup_v2_quota(tmp_path: pathlib.Path) -> None:
    assert cgroup_cpu_quota(tmp_path, _cgroup_v2(tmp_path, "150000 100000")) == 1.5


def test_cgroup_v2_unlimited(tmp_path: pathlib.Path) -> None:
    assert cgroup_cpu_quota(tmp_path, _cgroup_v2(tmp_path, "max 100000")) is None


def test_cgroup_v2_tightest_ancestor_wins(tmp_path: pathlib.Path) -> None:
    membership = _cgroup_v2(tmp_path, "100000 100000", nested="300000 100000")
    assert cgroup_cpu_quota(tmp_path, membership) == 1.0
    membership = _cgroup_v2(tmp_path, "max 100000", nested="200000 100000")
    assert cgroup_cpu_quota(tmp_path, membership) == 2.0


def test_cgroup_v1_quota(tmp_path: pathlib.Path) -> None:
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("250000")
    (v1 / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_quota(tmp_path) == 2.5
    (v1 / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_quota(tmp_path) is None


def test_quota_rounds_up_and_never_exceeds_affinity(tmp_path: pathlib.Path) -> None:
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000")
    (v1 / "cpu.cfs_quota_us").write_text("50000")  # half a CPU still keeps one worker busy
    assert usable_cpus(tmp_path) == 1
    (v1 / "cpu.cfs_quota_us").write_text("6400000")  # 64 CPUs cannot exceed the affinity mask
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_no_cgroup_files_means_no_limit(tmp_path: pathlib.Path) -> None:
    assert cgroup_cpu_quota(tmp_path / "missing") is None


def test_affinity_limits_the_count() -> None:
    code = "import os, escala; os.sched_setaffinity(0, {0}); print(escala.usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCALA_CPUS", "3")
    assert usable_cpus() == 3
    monkeypatch.setenv("ESCALA_CPUS", "zero")
    with pytest.raises(ValueError, match="ESCALA_CPUS must be a whole number"):
        usable_cpus()


def test_processes_default_to_the_usable_cores() -> None:
    with escala.Pool("processes") as pool:
        assert pool.workers == usable_cpus()


def _thread_vars(_: int) -> dict[str, str | None]:
    return {var: os.environ.get(var) for var in NATIVE_THREAD_VARS}


def test_workers_cap_native_thread_pools_to_their_share() -> None:
    cores = usable_cpus()
    (seen,) = escala.map(_thread_vars, [0], mode="processes", workers=1)
    assert set(seen.values()) == {str(cores)}
    with escala.Pool("processes", workers=cores * 2) as pool:
        (seen,) = pool.map(_thread_vars, [0])
    assert set(seen.values()) == {"1"}


def test_a_users_own_setting_is_respected() -> None:
    code = textwrap.dedent(
        """
        import os, escala
        def get(_):
            return os.environ["OMP_NUM_THREADS"]
        print(escala.map(get, [0], mode="processes", workers=1)[0])
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "5"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "5"


def test_workers_do_not_change_the_callers_environment() -> None:
    before = {var: os.environ.get(var) for var in NATIVE_THREAD_VARS}
    escala.map(_thread_vars, [0], mode="processes", workers=1)
    assert {var: os.environ.get(var) for var in NATIVE_THREAD_VARS} == before


def test_pools_loaded_before_fork_are_capped_in_workers() -> None:
    """numpy's BLAS pool, loaded in the parent and inherited through fork, must be cut to
    each worker's share of the cores, or N workers run N × cores BLAS threads."""
    pytest.importorskip("numpy")
    code = textwrap.dedent(
        """
        import numpy, escala
        from threadpoolctl import threadpool_info

        def blas_threads(_):
            return sorted({info["num_threads"] for info in threadpool_info()})

        workers = escala.usable_cpus() * 2  # more workers than cores: a share of one each
        # as many items as workers: a run starts no more workers than it has items
        items = range(workers)
        print(escala.map(blas_threads, items, mode="processes", workers=workers)[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("[1]", "[]")  # [] where numpy has no threaded BLAS
