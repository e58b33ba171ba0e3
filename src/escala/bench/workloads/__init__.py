"""The built-in workloads, one module each, imported by name when first asked for.

A new workload is one new module with a :class:`~.base.Workload` subclass, and one line in
``_REGISTRY``. Listing the names imports nothing, so ``escala demo --help`` stays quick.
"""

from __future__ import annotations

import importlib

from .base import Expected, Prepared, Workload

__all__ = ["Expected", "Prepared", "Workload", "get", "names"]

# name -> "module:Class", in the order tables and charts show them
_REGISTRY: dict[str, str] = {
    "cpu-python": "escala.bench.workloads.cpu_python:CpuPython",
    "cpu-nogil": "escala.bench.workloads.cpu_nogil:CpuNoGil",
    "sleep-io": "escala.bench.workloads.sleep_io:SleepIO",
    "http-io": "escala.bench.workloads.http_io:HttpIO",
    "file-io": "escala.bench.workloads.file_io:FileIO",
    "mixed": "escala.bench.workloads.mixed:Mixed",
    "trivial": "escala.bench.workloads.trivial:Trivial",
}


def names() -> list[str]:
    """Return the names of the built-in workloads, in display order."""
    return list(_REGISTRY)


def get(name: str) -> Workload:
    """Return the built-in workload called ``name``.

    Raises:
        ValueError: no workload has that name (the message lists those that exist).
    """
    try:
        target = _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(_REGISTRY)
        raise ValueError(f"unknown workload {name!r}; choose one of: {known}") from None
    module_name, _, class_name = target.partition(":")
    workload: Workload = getattr(importlib.import_module(module_name), class_name)()
    return workload
