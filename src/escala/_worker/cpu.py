"""How many cores this process may really use, and keeping native thread pools to a share.

``os.cpu_count()`` counts the host's cores. A container limited to 2 CPUs on a 64-core host
still sees 64, and a pool of 64 busy processes then fights over 2 cores. escala counts what
the process may use: its CPU affinity, and the CPU quota of its cgroup (v2 ``cpu.max`` or v1
``cpu.cfs_quota_us``), the way loky and Java's container support do. This is written here
rather than taken from a library because the libraries that do it (loky) bring a whole
process pool along with it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

__all__ = ["NATIVE_THREAD_VARS", "cap_native_threads", "loaded_pools_exceed", "usable_cpus"]

# Environment variables read by the native thread pools that numerical libraries start.
NATIVE_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)


def usable_cpus(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int:
    """Return how many CPUs this process may keep busy at once.

    The smallest of: the host's count, the CPU affinity mask, and the cgroup CPU quota
    (rounded up: a quota of 1.5 CPUs can keep two processes partly busy). The environment
    variable ``ESCALA_CPUS`` overrides all of them.

    Args:
        cgroup_root: where the cgroup file system is mounted (for tests).

    Returns:
        A count of at least 1.
    """
    override = os.environ.get("ESCALA_CPUS")
    if override:
        try:
            value = int(override)
        except ValueError:
            raise ValueError(f"ESCALA_CPUS must be a whole number, got {override!r}") from None
        if value < 1:
            raise ValueError(f"ESCALA_CPUS must be 1 or more, got {value}")
        return value
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)))
    root = os.fspath(cgroup_root)
    quota = _cached_quota(root) if root == _DEFAULT_ROOT else cgroup_cpu_quota(root)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


_DEFAULT_ROOT = "/sys/fs/cgroup"
_quota_cache: dict[str, tuple[float, float | None]] = {}
#: Seconds a cgroup quota reading is reused: it takes several file reads, and every run
#: asks; quotas change rarely (a container resized), so a few seconds late is fine.
QUOTA_TTL = 5.0


def _cached_quota(root: str) -> float | None:
    now = time.monotonic()
    cached = _quota_cache.get(root)
    if cached is not None and now - cached[0] < QUOTA_TTL:
        return cached[1]
    quota = cgroup_cpu_quota(root)
    _quota_cache[root] = (now, quota)
    return quota


def cgroup_cpu_quota(
    root: str | os.PathLike[str] = "/sys/fs/cgroup",
    self_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
) -> float | None:
    """Return the CPU quota of this process's cgroup in CPUs, or ``None`` if unlimited.

    Reads cgroup v2 (``cpu.max`` at the process's cgroup and each ancestor, the tightest
    winning) or, failing that, cgroup v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
    Any file that is missing or unreadable counts as "no limit there".

    Args:
        root: where the cgroup file system is mounted.
        self_cgroup: the file naming this process's cgroups.
    """
    if not sys.platform.startswith("linux"):
        return None
    base = Path(root)
    limits: list[float] = []
    for directory in _v2_dirs(base, Path(self_cgroup)):
        text = _read(directory / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                limits.append(int(quota) / int(period))
    if not limits:
        for sub in ("cpu,cpuacct", "cpu"):
            quota_text = _read(base / sub / "cpu.cfs_quota_us")
            period_text = _read(base / sub / "cpu.cfs_period_us")
            if quota_text and period_text and int(quota_text) > 0:
                limits.append(int(quota_text) / int(period_text))
                break
    return min(limits) if limits else None


def _v2_dirs(base: Path, self_cgroup: Path) -> list[Path]:
    """Return the cgroup v2 directories from this process's cgroup up to the root."""
    text = _read(self_cgroup)
    rel = ""
    for line in (text or "").splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
    dirs = []
    path = base / rel if rel else base
    while True:
        dirs.append(path)
        if path == base or base not in path.parents:
            break
        path = path.parent
    return dirs


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


_NATIVE_MODULES = ("numpy", "scipy", "torch", "sklearn")
_pool_sizes: tuple[int, ...] | None = None


def loaded_pools_exceed(threads: int) -> bool:
    """Say whether a native thread pool loaded in this process runs more than ``threads``.

    Asked in the parent before it forks workers, which inherit the loaded libraries and
    their pool sizes. The scan (threadpoolctl, a few milliseconds) runs once per process
    and only when a numerical library is imported; it also leaves threadpoolctl imported,
    so that forked workers do not each pay for importing it.
    """
    global _pool_sizes
    if not any(name in sys.modules for name in _NATIVE_MODULES):
        return False
    if _pool_sizes is None:
        try:
            from threadpoolctl import threadpool_info
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            return False
        _pool_sizes = tuple(int(info.get("num_threads") or 1) for info in threadpool_info())
    return any(size > threads for size in _pool_sizes)


def cap_native_threads(threads: int, *, loaded: bool = False) -> None:
    """Keep the native thread pools of this process to ``threads`` threads.

    Called in each worker process: a pool of N processes that each start a BLAS or OpenMP
    pool sized to every core would run N × cores threads on cores threads. Sets the
    environment variables the libraries read when they load (unless the user set them);
    with ``loaded``, also caps the pools already loaded (inherited through fork) through
    threadpoolctl.
    """
    for var in NATIVE_THREAD_VARS:
        os.environ.setdefault(var, str(threads))
    if not loaded:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return
    threadpool_limits(limits=threads)
