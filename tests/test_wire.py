"""What crosses to a worker process: the typed messages of the pipe, and the slot's layout."""

from __future__ import annotations

import pickle

import pytest

from escala import _options
from escala._worker import slots
from escala._worker.messages import Apply, Failure
from escala._worker.wire import InitFailed, Ran, Ready, Run, Stop, Unloadable

FAILURE = Failure(type_name="ValueError", message="no", traceback="Traceback ...")

MESSAGES = [
    Run(7, 1, b"fn", Apply.STAR, forget=True, timed=False, indices=range(3, 5), items=b"xy"),
    Run(8, 1, None, Apply.ONE, forget=False, timed=True, indices=[9], items=b"z"),
    Stop(),
    Ready(),
    InitFailed(FAILURE),
    Unloadable(FAILURE),
    Ran(b"values", {1: FAILURE}, 0.25),
    Ran(b"values", None, 0.0),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_crosses_the_pipe_as_itself(message: object) -> None:
    back = pickle.loads(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
    assert type(back) is type(message)
    assert repr(back) == repr(message)  # every field, by name


def test_a_slot_reads_back_what_its_worker_wrote() -> None:
    cells = memoryview(bytearray(8 * slots.SIZE)).cast("d")
    cells[slots.START] = 12.5
    cells[slots.TASK] = slots.base(41) + 6
    assert slots.read(cells) == (41, 6, 12.5)
    cells[slots.TASK] = slots.base(2**33 - 1) + slots.UNTRACKED - 1  # the largest of both
    assert slots.read(cells) == (2**33 - 1, slots.UNTRACKED - 1, 12.5)
    cells[slots.TASK] = slots.base(42) + slots.UNTRACKED
    assert slots.read(cells) == (42, None, 12.5)


def test_options_cap_batch_below_the_slots_span() -> None:
    # _options sits below _worker, so it spells the limit; this keeps the two in step
    assert _options._MAX_BATCH == slots.UNTRACKED
