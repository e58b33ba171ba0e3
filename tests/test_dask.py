"""What only Dask promises, on the session's Dask cluster; what both cluster engines
promise is in test_cluster.py."""

from __future__ import annotations

import os
import pathlib
import signal
from typing import Any

import pytest

import escala

pytest.importorskip("distributed")


def test_dask_runs_a_task_again_when_its_worker_dies(
    dask_cluster: Any, tmp_path: pathlib.Path
) -> None:
    """Dask runs a task whose worker died again on another (the session's cluster allows one
    failure, as do the local clusters escala starts: ``ALLOWED_FAILURES``), so one death
    costs it nothing that escala sees; Ray, told ``max_retries=0``, reports it at once."""

    def die_once(x: int) -> int:
        if x == 1 and not list(tmp_path.iterdir()):
            (tmp_path / "died").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 2

    with dask_cluster.as_current():
        outcomes = escala.map(die_once, range(3), mode="dask", errors="collect")
    assert [o.value for o in outcomes] == [0, 2, 4]
    assert outcomes[1].attempts == 1  # no retry of escala's: there was no error to retry
    assert (tmp_path / "died").exists()  # it did die once
    dask_cluster.wait_for_workers(2, timeout=30)
