"""The ``escala`` command: ``demo``, ``bench``, ``advise``, ``serve``, ``worker``, ``keys``
and ``load``.

The CLI is a client of the public API and of :mod:`escala.bench`, like any user. Mistakes
(a target that cannot be imported, an input file with a bad line, a function that raises
on the first item) end in one clear line on stderr and exit status 2 (1 when the user's
function itself failed), never in a traceback from deep inside.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import __version__, bench, usable_cpus
from .._core.plan import is_async
from .._errors import EscalaError
from .._options import MODES, Options
from ..advisor import measure, weigh
from ..bench.workloads.base import Prepared, Workload
from . import _load as _cli_load
from . import _service as _cli_service
from ._common import TaskFailed, UsageError
from ._common import positive_float as _positive_float
from ._common import positive_int as _positive_int

__all__ = ["main"]

DEMO_MODES = ("sequential", "threads", "processes", "async", "auto")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``escala`` command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        status: int = args.run(args)
        return status
    except UsageError as exc:
        print(f"escala {args.command}: {exc}", file=sys.stderr)
        return 2
    except TaskFailed as exc:
        print(f"escala {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"escala {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="escala",
        description="Run work sequentially, on threads, on processes or on asyncio, "
        "chosen by measurement.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the built-in workloads under every mode, side by side",
        description="Run built-in workloads (CPU-bound, GIL-releasing, sleeping, HTTP, "
        "file I/O, mixed, trivial) under every mode and show what each mode buys, and what "
        "mode='auto' chooses and why. Offline: the HTTP server is started on 127.0.0.1.",
    )
    demo.add_argument("--scale", type=_positive_float, default=1.0, help="work multiplier")
    demo.add_argument(
        "--workloads", type=_names, default=None, help="comma-separated (default: all)"
    )
    demo.add_argument(
        "--service",
        action="store_true",
        help="instead: escala serve under load from escala load (concurrency, offloading "
        "CPU work, admission control under overload); about a minute",
    )
    demo.add_argument(
        "--chart",
        help="where to save the chart (default escala-demo.png, with --service "
        "escala-demo-service.png)",
    )
    demo.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    demo.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    demo.set_defaults(run=_demo)

    for name, help_text in (
        ("bench", "run your function under several modes and compare"),
        ("advise", "say which mode suits your function, and why, without running it all"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("target", metavar="TARGET", help="package.module:function")
        inputs = sub.add_mutually_exclusive_group()
        inputs.add_argument("--range", type=_positive_int, metavar="N", help="items 0..N-1")
        inputs.add_argument(
            "--input", metavar="FILE", help="JSON lines: one item (or argument list) a line"
        )
        inputs.add_argument(
            "--items", metavar="MODULE:FUNCTION", help="a function returning the items"
        )
        sub.add_argument(
            "--star", action="store_true", help="each item is a list of arguments: fn(*item)"
        )
        if name == "bench":
            sub.add_argument(
                "--modes", type=_modes, default=None, help="comma-separated (default: all)"
            )
            sub.add_argument("--workers", type=_counts, default=None, help="a sweep, e.g. 1,2,4,8")
            sub.add_argument("--repeat", type=_positive_int, default=1, help="rounds per mode")
            sub.add_argument("--json", metavar="FILE", help="write the results as JSON")
            sub.add_argument("--plot", metavar="FILE", help="save a chart (PNG)")
            sub.set_defaults(run=_bench)
        else:
            sub.add_argument(
                "--address",
                metavar="ADDRESS",
                help="a Dask (tcp://HOST:PORT) or Ray (HOST:PORT, ray://HOST:PORT) cluster "
                "to weigh too: is it worth its cost per task?",
            )
            sub.set_defaults(run=_advise)

    _cli_service.add_commands(commands)
    _cli_load.add_commands(commands)
    return parser


# -- argument types ---------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _modes(text: str) -> list[str]:

    modes = _names(text)
    for mode in modes:
        if mode not in (*MODES, "auto"):
            known = ", ".join((*MODES, "auto"))
            raise argparse.ArgumentTypeError(f"unknown mode {mode!r} (known: {known})")
    return modes


def _counts(text: str) -> list[int]:
    return [_positive_int(part) for part in _names(text)]


# -- targets and inputs -----------------------------------------------------------------


def load_target(spec: str, what: str = "TARGET") -> Any:
    """Import ``package.module:attribute`` and return the attribute.

    The current directory is importable, as with ``python -m``.

    Raises:
        UsageError: a malformed spec, an import that fails, a missing attribute.
    """
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"{what} must look like package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"cannot import {module_name!r} for {what} {spec!r}: {type(exc).__name__}: {exc}"
        ) from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(
                f"{module_name!r} has no attribute {attribute!r} (from {what} {spec!r})"
            ) from None
    return obj


def load_function(spec: str) -> Callable[..., Any]:
    """Return the function named by TARGET.

    Raises:
        UsageError: it cannot be imported, or is not callable.
    """
    fn = load_target(spec)
    if not callable(fn):
        raise UsageError(f"TARGET {spec!r} is not callable (it is a {type(fn).__name__})")
    return fn  # type: ignore[no-any-return]


def load_items(args: argparse.Namespace) -> list[Any]:
    """Return the items asked for with ``--range``, ``--input`` or ``--items``.

    Raises:
        UsageError: no input given, an unreadable file, a bad line (named by number).
    """
    if args.range is not None:
        items: list[Any] = list(range(args.range))
    elif args.input is not None:
        items = _read_json_lines(Path(args.input))
    elif args.items is not None:
        source = load_target(args.items, "--items")
        if not callable(source):
            raise UsageError(f"--items {args.items!r} is not callable")
        try:
            produced = source()
            items = list(produced)
        except Exception as exc:
            raise TaskFailed(f"--items {args.items!r} raised {type(exc).__name__}: {exc}") from None
    else:
        raise UsageError(
            "give the inputs: --range N, --input FILE (JSON lines) or --items module:function"
        )
    if args.star:
        for number, item in enumerate(items, 1):
            if not isinstance(item, list | tuple):
                raise UsageError(f"--star: item {number} is not a list of arguments: {item!r}")
    return items


def _read_json_lines(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --input {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"--input {str(path)!r} is not UTF-8 text: {exc.reason}") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
    if not items:
        raise UsageError(f"--input {str(path)!r} holds no items")
    return items


class _Star:
    """``fn(*item)`` as a one-argument, picklable function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "task")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)

    def __call__(self, item: Sequence[Any]) -> Any:
        return self.fn(*item)


def _first_item_check(fn: Callable[..., Any], items: list[Any], spec: str) -> None:
    """Run the first item once, so a function that cannot work fails clearly, early."""
    try:
        result = fn(items[0])
        if hasattr(result, "__await__"):
            import asyncio

            asyncio.run(_awaited(result))
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise TaskFailed(
            f"{spec} raised on the first item ({items[0]!r}): {type(exc).__name__}: {exc} "
            f"(at {where.filename}:{where.lineno})"
        ) from None


async def _awaited(result: Any) -> Any:
    return await result


# -- commands ---------------------------------------------------------------------------


def _console() -> Console:
    return Console()


def _machine_line() -> str:

    return (
        f"escala {__version__} · Python {platform.python_version()} · "
        f"{usable_cpus()} usable core(s) of {os.cpu_count()} · {platform.system()}"
    )


@contextmanager
def _status(console: Any, text: str) -> Iterator[Callable[[str], None]]:
    with console.status(text) as status:
        yield lambda message: status.update(message)


def _demo(args: argparse.Namespace) -> int:
    if args.service:
        if args.workloads:
            raise UsageError("--workloads chooses the workloads of the demo without --service")
        # the service demo needs the serve and load extras: imported only when asked for
        from . import _demo_service

        return _demo_service.run(args, machine=_machine_line(), leftovers=_leftovers)

    known = bench.workloads.names()
    chosen = args.workloads or known
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise UsageError(f"unknown workload {unknown[0]!r} (known: {', '.join(known)})")
    console = _console()
    console.print(f"[bold]escala demo[/bold] · {_machine_line()}")
    console.print(
        "Each workload runs under every mode; speed-up is against sequential. "
        "'auto' measures the work first and chooses.\n"
    )
    started = time.perf_counter()
    comparisons = []
    with _status(console, "starting") as show:
        for name in chosen:
            workload = bench.workloads.get(name)
            show(f"running [bold]{workload.title}[/bold] under each mode…")
            comparisons.append(bench.compare(workload, DEMO_MODES, scale=args.scale))
    console.print(bench.table(comparisons))
    _print_auto(console, comparisons)
    chart = None if args.no_chart else (args.chart or "escala-demo.png")
    _outputs(console, comparisons, args.json, chart)
    console.print(f"\nDone in {time.perf_counter() - started:.1f} s; {_leftovers()}.")
    return 0


def _leftovers() -> str:
    """Say what this process left running: child processes, threads (checked, not assumed)."""
    import threading

    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    children: list[int] = []
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]

        children = [child.pid for child in psutil.Process().children(recursive=True)]
    except ImportError:  # pragma: no cover - psutil comes with escala[demo]
        pass
    if not threads and not children:
        return "checked: no thread or child process is left running"
    return f"still running: threads {threads}, child processes {children}"


def _print_auto(console: Any, comparisons: Sequence[Any]) -> None:
    console.print("\n[bold]What auto chose, and why[/bold]")
    for comparison in comparisons:
        advice = comparison.advice
        if advice is None:
            continue
        # auto chooses among the modes that run this very function: the async row of a
        # built-in workload runs its async twin, another function
        same_function = ("async",) if advice.mode == "async" else ()
        fastest = comparison.fastest(("sequential", "threads", "processes", *same_function))
        verdict = ""
        if fastest is not None:
            verdict = (
                " (the fastest here)"
                if fastest.mode == advice.mode
                else f" (fastest here: {fastest.mode})"
            )
        console.print(
            f"\n[bold]{comparison.title}[/bold]: auto chose [cyan]{advice.mode}[/cyan] "
            f"with {advice.workers} worker(s){verdict}"
        )
        for line in advice.explain().splitlines():
            console.print(f"  {line}", highlight=False)


def _outputs(
    console: Any, comparisons: Sequence[Any], json_path: str | None, chart: str | None
) -> None:

    if json_path:
        Path(json_path).write_text(json.dumps(bench.to_json(comparisons), indent=2) + "\n")
        console.print(f"\nResults written to [bold]{json_path}[/bold]")
    if chart:
        try:
            saved = bench.save_chart(comparisons, chart)
        except ImportError:
            console.print("\nThe chart needs matplotlib: pip install 'escala[demo]'")
        else:
            console.print(f"\nChart saved to [bold]{saved.resolve()}[/bold]")


def _bench(args: argparse.Namespace) -> int:

    fn = load_function(args.target)
    items = load_items(args)
    task = _Star(fn) if args.star else fn
    _first_item_check(task, items, args.target)

    modes = args.modes or (
        ["sequential", "async", "auto"]
        if is_async(fn)
        else ["sequential", "threads", "processes", "auto"]
    )
    console = _console()
    console.print(
        f"[bold]escala bench[/bold] {args.target} · {len(items):,} items · {_machine_line()}"
    )
    comparisons = []
    with _status(console, "starting") as show:
        for workers in args.workers or [None]:
            label = args.target if workers is None else f"{args.target} · {workers} workers"
            show(f"running {label}…")
            workload = _TargetWorkload(label, task, items, is_async(fn))
            comparisons.append(bench.compare(workload, modes, workers=workers, repeat=args.repeat))
    console.print(bench.table(comparisons))
    if "auto" in modes:
        _print_auto(console, comparisons[:1])
    _outputs(console, comparisons, args.json, args.plot)
    failed = [run for c in comparisons for run in c.results if run.error]
    return 1 if failed else 0


def _advise(args: argparse.Namespace) -> int:

    if args.address is not None:
        try:
            Options(mode="auto", address=args.address)  # its form, before any work
        except ValueError as bad:
            raise UsageError(f"--address: {bad}") from None
    fn = load_function(args.target)
    items = load_items(args)
    task = _Star(fn) if args.star else fn
    advice, sample, probe = measure(task, iter(items), len(items))
    try:
        if args.address is not None:
            advice, backend = weigh(advice, args.address)
            if backend is not None:
                backend.shutdown(cancel=False)
    except EscalaError as unreachable:
        raise UsageError(str(unreachable)) from None
    finally:
        if probe is not None:
            probe.hand_over(lambda group: None)
            probe.join()
    if sample is not None and sample.groups and 0 in sample.groups[0].failures:
        exc = sample.groups[0].failures[0]
        raise TaskFailed(
            f"{args.target} raised on the first item ({items[0]!r}): {type(exc).__name__}: {exc}"
        )
    console = _console()
    console.print(f"[bold]escala advise[/bold] {args.target} · {len(items):,} items")
    console.print(
        f"mode=[cyan]{advice.mode}[/cyan] workers={advice.workers} batch={advice.batch} "
        f"expected speed-up≈{advice.speedup:.1f}×"
    )
    console.print(advice.explain(), highlight=False)
    return 0


class _TargetWorkload(Workload):
    """A user's function and items, shaped like a built-in workload for the bench runner."""

    expected = None  # type: ignore[assignment]  # nobody knows the right mode in advance
    explanation = ""

    def __init__(self, name: str, fn: Callable[..., Any], items: list[Any], coroutine: bool):
        self.name = self.title = name  # type: ignore[misc]
        self._fn, self._items, self._coroutine = fn, items, coroutine

    @contextmanager
    def prepared(self, scale: float = 1.0) -> Iterator[Prepared]:
        yield Prepared(self._fn, self._items, self._fn if self._coroutine else None)
