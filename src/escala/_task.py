"""``@escala.task``: say what kind of work a function does, and register it by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

__all__ = ["Kind", "kind_of", "registered", "task"]

Kind = Literal["cpu", "io"]
F = TypeVar("F", bound=Callable[..., Any])

_ATTRIBUTE = "__escala_kind__"
_registry: dict[str, Callable[..., Any]] = {}


@overload
def task(fn: F, /) -> F: ...
@overload
def task(*, kind: Kind | None = None, name: str | None = None) -> Callable[[F], F]: ...
def task(
    fn: F | None = None, /, *, kind: Kind | None = None, name: str | None = None
) -> F | Callable[[F], F]:
    """Mark a function as an escala task, with a hint of the work it does.

    ``kind="cpu"`` (it computes) or ``kind="io"`` (it waits) lets ``mode="auto"`` choose
    without measuring; the function itself is returned unchanged. Every decorated function
    is registered under ``name`` (default: ``module.qualname``), which is how a service
    finds the tasks it may run.

    Raises:
        ValueError: an unknown kind, or a name already taken by another function.
    """
    if kind not in (None, "cpu", "io"):
        raise ValueError(f"kind must be 'cpu' or 'io', got {kind!r}")

    def mark(f: F) -> F:
        if not callable(f):
            raise TypeError(f"@escala.task decorates functions, got {f!r}")
        key = name or f"{f.__module__}.{f.__qualname__}"
        known = _registry.get(key)
        if known is not None and getattr(known, "__code__", known) is not getattr(f, "__code__", f):
            raise ValueError(f"a different task is already registered as {key!r}")
        if kind is not None:
            setattr(f, _ATTRIBUTE, kind)
        _registry[key] = f
        return f

    return mark(fn) if fn is not None else mark


def kind_of(fn: Callable[..., Any]) -> Kind | None:
    """Return the ``kind`` hint given with ``@escala.task``, if any."""
    kind = getattr(fn, _ATTRIBUTE, None)
    return kind if kind in ("cpu", "io") else None


def registered() -> dict[str, Callable[..., Any]]:
    """Return the registered tasks by name (a copy)."""
    return dict(_registry)
