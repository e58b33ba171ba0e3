"""Execution models, one module each, loaded by name when first chosen.

A new model is one new module with a class that implements :class:`~.base.Backend`, and one
line in ``_REGISTRY``. Nothing else imports a backend module directly, so an optional engine
(Ray, Dask) costs nothing until a run asks for it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Backend

__all__ = ["create"]

# mode -> (module, class, the extra to install when the import fails)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "sequential": ("escala.backends.sequential", "SequentialBackend", None),
    "threads": ("escala.backends.threads", "ThreadBackend", None),
    "processes": ("escala.backends.processes", "ProcessBackend", None),
    "async": ("escala.backends.asyncio", "AsyncBackend", None),
    "dask": ("escala.backends.dask", "DaskBackend", "dask"),
    "ray": ("escala.backends.ray", "RayBackend", "ray"),
}


def create(mode: str, workers: int, **options: Any) -> Backend:
    """Return a new, unstarted backend for ``mode``.

    Raises:
        EngineMissing: the mode needs an optional package that is not installed.
    """
    module_name, class_name, extra = _REGISTRY[mode]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None:
            raise
        from .._errors import EngineMissing

        raise EngineMissing(
            f"mode={mode!r} needs an optional package: pip install 'escala[{extra}]'"
        ) from exc
    backend: Backend = getattr(module, class_name)(workers, **options)
    return backend
