"""What every ``escala`` subcommand shares: its two errors and its argument types."""

from __future__ import annotations

import argparse

__all__ = ["TaskFailed", "UsageError", "positive_float", "positive_int"]


class UsageError(Exception):
    """A mistake in what was asked: said in one line, exit status 2."""


class TaskFailed(Exception):
    """The user's function raised: said with its own error, exit status 1."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value
