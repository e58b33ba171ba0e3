"""Getting functions, items, results and exceptions across a process boundary, or saying why not.

Plain pickle is fast (C) and handles what most tasks send; cloudpickle handles what plain
pickle refuses (lambdas, closures, functions defined in ``__main__`` or a notebook). Items
and results try plain pickle first and fall back to cloudpickle; the function always goes
through cloudpickle, once per worker, since that is what makes ``__main__`` functions work
under every start method.

Every failure is pinned to one task: a batch that does not pickle is split to find the
item at fault, and an exception that cannot make the round trip travels as its type name,
message and traceback instead of breaking the pool (the classic ``multiprocessing`` hang).
"""

from __future__ import annotations

import pickle
import reprlib
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from .._errors import SendError
from .messages import Failure

__all__ = [
    "dump_exception",
    "dump_function",
    "dump_values",
    "dumps",
    "loads",
    "short_repr",
]

PROTOCOL = pickle.HIGHEST_PROTOCOL
loads = pickle.loads

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60


def short_repr(obj: object) -> str:
    """Return a repr short enough for an error message."""
    try:
        return _repr.repr(obj)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{type(obj).__qualname__} object>"


def dumps(obj: object) -> bytes:
    """Pickle ``obj`` with plain pickle, falling back to cloudpickle.

    Raises:
        Exception: whatever cloudpickle raised when neither could do it.
    """
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        data: bytes = cloudpickle.dumps(obj, PROTOCOL)
        return data


def dump_function(fn: object) -> bytes:
    """Pickle the task's function for the workers.

    Raises:
        SendError: the function cannot be pickled; the message says what to do.
    """
    try:
        data: bytes = cloudpickle.dumps(fn, PROTOCOL)
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or short_repr(fn)
        raise SendError(
            f"the function {name} cannot be sent to a worker process: "
            f"{type(exc).__name__}: {exc}. Make it a plain function (it may capture only "
            "picklable values), or use mode='threads'."
        ) from exc
    return data


def dump_values(
    values: Sequence[Any], what: str, name: Callable[[int], str]
) -> tuple[bytes, dict[int, Failure]]:
    """Pickle a list of items or results, isolating the ones that cannot be pickled.

    Args:
        values: the objects to send.
        what: "argument" or "result", for the error message.
        name: how to name position ``i`` in a message (for example "task #17").

    Returns:
        The pickled list (``None`` in place of each bad value) and a failure for each bad
        position.
    """
    try:
        return dumps(list(values)), {}
    except Exception:
        pass
    good: list[Any] = []
    bad: dict[int, Failure] = {}
    for pos, value in enumerate(values):
        try:
            dumps(value)
        except Exception as exc:
            error = _send_error(what, name(pos), value, exc)
            bad[pos] = Failure(error=error)
            good.append(None)
        else:
            good.append(value)
    return dumps(good), bad


def _send_error(what: str, task: str, value: object, exc: BaseException) -> SendError:
    if what == "argument":
        advice = (
            "Pass something picklable (a path or a key instead of an open file, lock or "
            "connection), or use mode='threads'."
        )
        subject = f"the argument of {task} ({short_repr(value)}, a {type(value).__qualname__})"
        verb = "cannot be sent to a worker process"
    else:
        advice = "Return something picklable, or use mode='threads'."
        subject = f"the result of {task} ({short_repr(value)}, a {type(value).__qualname__})"
        verb = "cannot be sent back from the worker process"
    error = SendError(f"{subject} {verb}: {type(exc).__name__}: {exc}. {advice}")
    error.__cause__ = exc
    return error


def dump_exception(exc: BaseException, where: str) -> Failure:
    """Prepare an exception raised in a worker for the trip back to the caller.

    The exception is pickled and, in the worker, unpickled again: an exception class whose
    constructor needs arguments that ``args`` does not hold fails only when *unpickled*, so
    the round trip is tried here, where the failure can still be described.
    """
    tb = "".join(traceback.format_exception(exc))
    failure = Failure(
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=_safe_str(exc),
        traceback=tb,
        where=where,
    )
    try:
        payload = _dumps_plainly(exc)
        loads(payload)
    except Exception as why:
        failure.message += f" [it could not be sent back as itself: {type(why).__name__}: {why}]"
    else:
        failure.payload = payload
    return failure


def _dumps_plainly(exc: BaseException) -> bytes:
    """Pickle an exception without reducers other libraries registered for every type.

    Importing ``distributed`` installs tblib's reducers for all exception classes, in the
    caller and (through fork) in its worker processes; they drop attributes that are not in
    ``args`` (``SystemExit(7).code`` comes back ``None``). The traceback travels as text here.
    """
    import copyreg
    import io

    table = {
        kind: reducer
        for kind, reducer in copyreg.dispatch_table.items()
        if not getattr(reducer, "__module__", "").startswith("tblib")
    }
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, PROTOCOL)
    pickler.dispatch_table = table
    try:
        pickler.dump(exc)
    except Exception:
        return dumps(exc)
    return buffer.getvalue()


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__qualname__}: str() failed>"
