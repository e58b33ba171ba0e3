"""escala: run each piece of work the right way, sequentially, concurrently or in parallel.

The map of the house (``ls`` draws it; data flows one way, top to bottom; each layer imports
only the layers below it, which ``tests/test_architecture.py`` checks)::

    cli/  service/  load/  store/  bench/     clients of the public face, like any user
        │
    escala.map / imap / amap / aimap / Pool   _api.py _pool.py    options in, results out
    mode="auto"                               _auto.py            measure, decide, run
        │
    advisor/          sample, measure hand-off costs, decide, explain
        │
    _core/            one run: start_run() assembles plan, backend and scheduler;
        │             the drivers (sync, async) move events; the Scheduler (sans I/O) owns
        │             window, batching, retries, order and error policy
    backends/         one module per execution model behind one protocol, loaded by name
        │
    _worker/          what crosses to a worker and runs there: messages, pickling, the
        │             worker's context, usable cores
    _options.py _task.py _errors.py            typed options, task hints, the exception tree
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
