"""escala: run each piece of work the right way, sequentially, concurrently or in parallel.

The map of the house (data flows one way, top to bottom)::

    escala.map / imap / amap / aimap / Pool        _api.py      options in, results out
        │ Options (frozen, validated)              _options.py  _pool.py
        │ plan: backend, workers, scheduler        _plan.py
        ▼
    driver: sync (queue) or async (asyncio.Queue)  _drive.py    moves events, owns no policy
        │ ▲
        ▼ │
    Scheduler (sans I/O): window, batching,        _engine.py   the same for every mode
    retries, ordering, error policy
        │ batches             ▲ Done
        ▼                     │
    backend, one per mode                          backends/    sequential, threads,
    (loaded by name on first use)                               processes, asyncio
        │
        ▼
    WorkerContext: runs tasks inside a worker      _calls.py    state, initializer, loops

``mode="auto"`` (the default of map/imap) first asks the advisor (``advisor/``: sample,
measure, decide, explain) and then runs the rest through the same driver (``_auto.py``).

Cross-cutting: ``_errors.py`` (the exception tree), ``_pickling.py`` (what crosses a process
boundary), ``_cpu.py`` (usable cores, native thread caps), ``_progress.py`` (rich bar).
Backends never import each other, the API or the drivers.
"""

from __future__ import annotations

from ._api import aimap as aimap
from ._api import amap as amap
from ._api import imap as imap
from ._api import map as map
from ._core.scheduler import Outcome as Outcome
from ._errors import BrokenWorker as BrokenWorker
from ._errors import EngineMissing as EngineMissing
from ._errors import EscalaError as EscalaError
from ._errors import PoolClosed as PoolClosed
from ._errors import RemoteError as RemoteError
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import SendError as SendError
from ._errors import TaskError as TaskError
from ._errors import TaskTimeout as TaskTimeout
from ._errors import WorkerDied as WorkerDied
from ._options import MODES as MODES
from ._options import Options as Options
from ._options import Retry as Retry
from ._pool import Pool as Pool
from ._task import task as task
from ._worker.context import worker_state as worker_state
from ._worker.cpu import usable_cpus as usable_cpus
from .advisor import Advice as Advice
from .advisor import advise as advise

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "Advice",
    "BrokenWorker",
    "EngineMissing",
    "EscalaError",
    "Options",
    "Outcome",
    "Pool",
    "PoolClosed",
    "RemoteError",
    "RemoteTraceback",
    "Retry",
    "SendError",
    "TaskError",
    "TaskTimeout",
    "WorkerDied",
    "advise",
    "aimap",
    "amap",
    "imap",
    "map",
    "task",
    "usable_cpus",
    "worker_state",
]
