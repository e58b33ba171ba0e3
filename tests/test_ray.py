"""What only Ray promises (or refuses), on the session's local Ray; what both cluster
engines promise is in test_cluster.py.

Ray allows one connection per process: while this one holds the session's, an address of
another cluster cannot be reached from here, and escala says so instead of connecting.
"""

from __future__ import annotations

import pytest

import escala

ray = pytest.importorskip("ray")


def inc(x: int) -> int:
    return x + 1


def test_another_address_than_the_current_cluster_is_refused(ray_cluster: str) -> None:
    with pytest.raises(escala.EscalaError, match="already connected"):
        escala.map(inc, [1], mode="ray", address="127.0.0.1:1")
    assert ray.is_initialized()  # the session's connection, untouched


def test_auto_refuses_another_ray_cluster_than_the_current_one(
    ray_cluster: str, fresh_figures: None
) -> None:
    with pytest.raises(escala.EscalaError, match="already connected"):
        escala.map(inc, range(1000), address="127.0.0.1:1")
    assert ray.is_initialized()
