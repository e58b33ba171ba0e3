"""escala load: a load generator that tells the truth, built on escala's own Pool.

Most Python load tools wait for each answer before sending the next request, so a server
that stalls looks fast: nobody sent anything during the stall ("coordinated omission").
Here the open model sends at intended times whatever is in flight, measures latency from
those times, counts what it could not send, and says when it fell behind itself.

The map of the package::

    LoadSpec (_spec.py)  what to send, how paced, the bounds; durations parsed
        │
    run / arun (_run.py)  one event loop per process, P processes through escala.Pool,
        │                 a shared Board of counters (_board.py) for start and progress
        ├── open model (_open.py)      intended send times, in-flight cap → dropped
        └── closed model (_closed.py)  N users: request, answer, think, again
                │ each request: _request.py (aiohttp, no hidden connection cap)
                ▼
    Recorder (_record.py)  outcomes, HdrHistograms (_histogram.py), per-second timeline
        │ added across processes, losslessly
        ▼
    LoadReport (_report.py)  figures, validity verdict, JSON
        └── shown by _show.py: rich tables, progress line, PNG chart

    compare (_compare.py)  the same requests one after another, then together

Example::

    from escala import load

    spec = load.LoadSpec(url="http://127.0.0.1:8000/v1/run/echo", rate=500, duration=10)
    report = load.run(spec)
    print(report.ok.percentile(99), report.valid)

Needs ``pip install 'escala[load]'`` (aiohttp, hdrhistogram).
"""

from __future__ import annotations

from ._compare import Comparison as Comparison
from ._compare import compare as compare
from ._histogram import Histogram as Histogram
from ._record import Verdict as Verdict
from ._report import LoadReport as LoadReport
from ._request import check_target as check_target
from ._run import LoadProgress as LoadProgress
from ._run import arun as arun
from ._run import run as run
from ._spec import Arrivals as Arrivals
from ._spec import LoadError as LoadError
from ._spec import LoadSpec as LoadSpec
from ._spec import Model as Model
from ._spec import parse_duration as parse_duration

__all__ = [
    "Arrivals",
    "Comparison",
    "Histogram",
    "LoadError",
    "LoadProgress",
    "LoadReport",
    "LoadSpec",
    "Model",
    "Verdict",
    "arun",
    "check_target",
    "compare",
    "parse_duration",
    "run",
]
