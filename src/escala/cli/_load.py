"""The ``escala load`` command: send load to a URL and report what it did, truthfully.

Kept apart from ``cli.py`` so that the other commands never import aiohttp. Every value is
read here rather than by argparse types, so that a mistake is one line and exit status 2,
like the other commands' errors, instead of argparse's usage block.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from ._common import UsageError

__all__ = ["add_commands"]

_EXAMPLES = """\
examples:
  escala load http://127.0.0.1:8000/v1/run/echo -X POST --rate 2000 --duration 30s
  escala load URL --users 200 --duration 30s
  escala load http://127.0.0.1:8000/v1/run/nap --body '{"args": [0.05]}' --compare

The open model (--rate) sends at intended times whatever is in flight and measures latency
from those times: a stalling server shows. The closed model (--users) waits for each answer
before the next request, as most tools do, and hides stalls. With neither: one user.
"""


def add_commands(commands: Any) -> None:
    """Add ``load`` to the ``escala`` parser's subcommands."""
    load = commands.add_parser(
        "load",
        help="send load to a URL and report what it did (open or closed model)",
        description="Send requests to URL at a rate (open model) or from N users (closed\n"
        "model), one event loop per process, and report outcomes by class, latency\n"
        "percentiles from full histograms, a timeline, and whether the generator kept up.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load.add_argument("url", metavar="URL", help="the target, e.g. http://127.0.0.1:8000/v1/…")
    pacing = load.add_argument_group("pacing")
    pacing.add_argument("--rate", metavar="R", help="requests per second: the open model")
    pacing.add_argument("--users", metavar="N", help="concurrent users: the closed model")
    pacing.add_argument(
        "--duration",
        metavar="D",
        default="10s",
        help="how long to send: 500ms, 30s, 2m, 1h (default 10s)",
    )
    pacing.add_argument("--requests", metavar="N", help="stop after N requests")
    pacing.add_argument(
        "--arrivals", metavar="KIND", default="constant", help="constant (default) or poisson"
    )
    pacing.add_argument("--think", metavar="S", default="0", help="users' pause between requests")
    pacing.add_argument("--seed", metavar="N", help="seed of the Poisson arrivals")
    generator = load.add_argument_group("generator")
    generator.add_argument(
        "--processes",
        metavar="P",
        help="generator processes (default: what the load needs, "
        "one per 1,000 requests/s or per user, at most the usable cores)",
    )
    generator.add_argument(
        "--max-inflight",
        metavar="N",
        default="10000",
        help="requests in flight at once (open model; default 10000); more are dropped",
    )
    generator.add_argument(
        "--timeout", metavar="S", default="10s", help="per request (default 10s)"
    )
    generator.add_argument(
        "--allow-remote", action="store_true", help="allow a target on another machine"
    )
    request = load.add_argument_group("request")
    request.add_argument(
        "-X", "--method", metavar="METHOD", default="", help="GET, or POST with a body"
    )
    request.add_argument(
        "-H", "--header", metavar="'NAME: VALUE'", action="append", default=[], help="repeatable"
    )
    request.add_argument("--body", metavar="JSON", help="inline JSON body")
    request.add_argument("--body-file", metavar="FILE", help="body read from a file")
    request.add_argument("--token", metavar="KEY", help="an escala API key (Bearer)")
    output = load.add_argument_group("output")
    output.add_argument("--json", metavar="FILE", help="write the report as JSON")
    output.add_argument("--plot", metavar="FILE", help="save latency charts (PNG)")
    versus = load.add_argument_group("one after another vs simultaneously")
    versus.add_argument(
        "--compare",
        action="store_true",
        help="send the same requests one after another, then simultaneously",
    )
    versus.add_argument(
        "--count", metavar="N", default="200", help="requests in each run (default 200)"
    )
    versus.add_argument(
        "--concurrency", metavar="C", default="20", help="at once in the 2nd run (default 20)"
    )
    load.set_defaults(run=_load)


def _load(args: argparse.Namespace) -> int:
    try:
        # escala.load needs the load extra (aiohttp, hdrhistogram)
        from .. import load
        from ..load import _show
        from ..load._spec import parse_body, parse_header
    except ImportError as exc:
        raise UsageError(f"escala load needs {exc.name}: pip install 'escala[load]'") from None
    spec = _spec(args, load, parse_body, parse_header)
    if args.compare and args.plot:
        raise UsageError("--plot draws one run: leave it out with --compare")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        # said before the run, not after minutes of load whose figures could not be kept
        folder = Path(path).resolve().parent if path else None
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise UsageError(f"cannot write {flag} {path!r}: {folder} is not a writable folder")
    try:
        load.check_target(spec)
    except load.LoadError as exc:
        raise UsageError(str(exc)) from None

    console = Console()
    if not console.is_terminal:
        # piped to a file or a CI log: no terminal to fit, so never cut a figure to 80
        console = Console(width=max(console.width, 132))
    # the live line goes to stderr and disappears: stdout is for the report alone
    with Live(console=Console(stderr=True), auto_refresh=False, transient=True) as live:
        if args.compare:
            count = _whole(args.count, "--count")
            concurrency = _whole(args.concurrency, "--concurrency")
            comparison = load.compare(
                spec,
                count=count,
                concurrency=concurrency,
                progress=lambda name, where: live.update(
                    _show.progress_line(where, name), refresh=True
                ),
            )
        else:
            report = load.run(
                spec, progress=lambda where: live.update(_show.progress_line(where), refresh=True)
            )
    if args.compare:
        console.print(_show.comparison_table(comparison))
        if args.json:
            _write_json(console, args.json, _comparison_json(comparison))
        return 130 if comparison.interrupted else 0
    console.print(_show.report_view(report))
    if args.json:
        _write_json(console, args.json, report.to_json())
    if args.plot:
        try:
            saved = _show.save_plot(report, args.plot)
        except ImportError:
            console.print("The chart needs matplotlib: pip install 'escala[demo]'")
        else:
            console.print(f"Chart saved to [bold]{saved}[/bold]")
    return 130 if report.interrupted else 0


def _spec(args: argparse.Namespace, load: Any, parse_body: Any, parse_header: Any) -> Any:
    """Return the LoadSpec the arguments ask for; mistakes as one-line UsageErrors."""
    try:
        headers = [parse_header(text) for text in args.header]
        if args.token:
            headers.append(("Authorization", f"Bearer {args.token}"))
        if args.body is not None and args.body_file is not None:
            raise UsageError("give --body or --body-file, not both")
        body = parse_body(args.body) if args.body is not None else None
        if args.body_file is not None:
            try:
                body = Path(args.body_file).read_bytes()
            except OSError as exc:
                raise UsageError(
                    f"cannot read --body-file {args.body_file!r}: {exc.strerror or exc}"
                ) from None
        return load.LoadSpec(
            url=args.url,
            rate=None if args.rate is None else _number(args.rate, "--rate"),
            users=None if args.users is None else _whole(args.users, "--users"),
            duration=load.parse_duration(args.duration),
            requests=None if args.requests is None else _whole(args.requests, "--requests"),
            arrivals=args.arrivals,
            processes=None if args.processes is None else _whole(args.processes, "--processes"),
            max_inflight=_whole(args.max_inflight, "--max-inflight"),
            timeout=_seconds(load, args.timeout, "--timeout"),
            think=0.0
            if args.think.strip() in ("0", "0s")
            else _seconds(load, args.think, "--think"),
            method=args.method,
            headers=tuple(headers),
            body=body,
            seed=None if args.seed is None else _whole(args.seed, "--seed", least=0),
            allow_remote=args.allow_remote,
        )
    except load.LoadError as exc:
        raise UsageError(str(exc)) from None


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {text!r}") from None


def _whole(text: str, name: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, got {text!r}") from None
    if value < least:
        raise UsageError(f"{name} must be {least} or more, got {value}")
    return value


def _seconds(load: Any, text: str, name: str) -> float:
    try:
        return float(load.parse_duration(text))
    except load.LoadError as exc:
        raise UsageError(f"{name}: {exc}") from None


def _comparison_json(comparison: Any) -> dict[str, Any]:
    return {
        "count": comparison.count,
        "concurrency": comparison.concurrency,
        "speedup": round(comparison.speedup, 3),
        "interrupted": comparison.interrupted,
        "littles_law": comparison.littles_law(),
        "one_by_one": comparison.one_by_one.to_json(),
        "together": None if comparison.together is None else comparison.together.to_json(),
    }


def _write_json(console: Any, path: str, data: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        print(f"escala load: cannot write --json {path!r}: {exc.strerror or exc}", file=sys.stderr)
        return
    console.print(f"Report written to [bold]{path}[/bold]")
