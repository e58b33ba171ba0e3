"""The tasks a service may run: registered with ``@escala.task``, looked up by name only.

Nothing a client sends is ever executed as code or unpickled: a request names a task,
and its arguments are JSON values handed to that function.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._task import kind_of, registered

__all__ = ["AppError", "TaskSpec", "load_app", "specs_of"]

Pool = Literal["cpu", "io"]


class AppError(Exception):
    """The application module cannot be loaded or has no tasks."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task the service offers: its public name, its function, and where it runs."""

    name: str
    fn: Callable[..., Any]
    pool: Pool  # "io": on the event loop or the thread pool; "cpu": the process pool
    is_async: bool
    signature: inspect.Signature | None
    doc: str

    def check_arguments(self, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise ``TypeError`` when the arguments do not fit the task's signature."""
        if self.signature is not None:
            self.signature.bind(*args, **kwargs)


def spec_of(name: str, fn: Callable[..., Any]) -> TaskSpec:
    """Describe one task. Coroutine functions wait, so they run as I/O tasks.

    A plain function runs in the process pool unless it is marked ``kind="io"``: a
    function of unknown kind must never be able to block the event loop, and a process
    is the one place where it cannot.
    """
    is_async = inspect.iscoroutinefunction(fn)
    pool: Pool = "io" if is_async or kind_of(fn) == "io" else "cpu"
    try:
        signature: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: let the call decide
        signature = None
    doc = inspect.getdoc(fn) or ""
    return TaskSpec(name, fn, pool, is_async, signature, doc.split("\n\n")[0])


def specs_of(tasks: Mapping[str, Callable[..., Any]]) -> dict[str, TaskSpec]:
    """Describe the given tasks by name."""
    return {name: spec_of(name, fn) for name, fn in tasks.items()}


def load_app(module: str) -> dict[str, Callable[..., Any]]:
    """Import the application module and return the tasks it registered, by public name.

    Names are the registered names, with the module's own prefix dropped:
    ``tasks.fetch_profile`` is offered as ``fetch_profile``.

    Raises:
        AppError: the module cannot be imported, or registers no task.
    """
    before = set(registered())
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise AppError(
            f"cannot import the app module {module!r}: {exc}. Run escala from the folder "
            "that holds it, or give its dotted name (package.module)"
        ) from exc
    prefix = f"{imported.__name__}."
    tasks: dict[str, Callable[..., Any]] = {}
    for key, fn in registered().items():
        if key in before and getattr(fn, "__module__", None) != imported.__name__:
            continue
        public = key.removeprefix(prefix)
        if public in tasks:
            raise AppError(f"two tasks of {module!r} are both named {public!r}")
        tasks[public] = fn
    if not tasks:
        raise AppError(
            f"{module!r} registers no task: decorate the functions to offer with @escala.task"
        )
    return tasks
