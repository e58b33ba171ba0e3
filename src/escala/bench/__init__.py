"""Side-by-side runs of one workload under every mode: what ``escala demo | bench`` run.

The map (data flows one way, top to bottom)::

    workloads/            built-in work, one module each, behind the Workload protocol
      base.py             Workload, Prepared: prepared(scale) sets up and tears down
      __init__.py         registry: names(), get(name), imported by name on first use
        │ Prepared(fn, items, afn)
        ▼
    _measure.py           run_one: one mode, measured (wall, CPU incl. children, peak RSS,
                          correct?) ─▶ RunResult;  compare: every mode ─▶ Comparison
    _sampler.py           the peak-memory thread (psutil, optional)
        │ Comparison (figures against sequential: speed-up, efficiency, CPU use)
        ▼
    _report.py            table (rich), explanations (the advisor's), save_chart (PNG),
                          to_json

Example::

    from rich.console import Console
    from escala import bench

    runs = [bench.compare(name, scale=0.5) for name in bench.workloads.names()]
    Console().print(bench.table(runs))
    bench.save_chart(runs, "modes.png")
"""

from __future__ import annotations

from . import workloads as workloads
from ._measure import MODES as MODES
from ._measure import Comparison as Comparison
from ._measure import Figures as Figures
from ._measure import RunResult as RunResult
from ._measure import Status as Status
from ._measure import compare as compare
from ._measure import run_one as run_one
from ._report import explanations as explanations
from ._report import save_chart as save_chart
from ._report import table as table
from ._report import to_json as to_json
from .workloads import Prepared as Prepared
from .workloads import Workload as Workload

__all__ = [
    "MODES",
    "Comparison",
    "Figures",
    "Prepared",
    "RunResult",
    "Status",
    "Workload",
    "compare",
    "explanations",
    "run_one",
    "save_chart",
    "table",
    "to_json",
    "workloads",
]
