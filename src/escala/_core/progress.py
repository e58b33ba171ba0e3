"""The progress bar: rich, on stderr, never on stdout and never in the results."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["NO_PROGRESS", "KeptOpen", "NoProgress", "Progress", "ProgressBar", "progress_for"]


class Progress(Protocol):
    """What a driver needs of a bar: count tasks handed back, and close at the end."""

    def advance(self, count: int) -> None: ...

    def close(self) -> None: ...


class ProgressBar:
    """A progress bar with count, rate and time left, drawn by rich on stderr.

    Args:
        description: the label on the left.
        total: how many tasks, when the input has a length.
    """

    def __init__(self, description: str, total: int | None) -> None:
        # rich.progress costs tens of milliseconds to import: only runs that draw a bar pay
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        class RateColumn(ProgressColumn):
            """Tasks per second (rich's own speed column counts bytes)."""

            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text("" if speed is None else f"{speed:,.1f} tasks/s", style="cyan")

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            refresh_per_second=8,
            # rich would otherwise capture the program's own prints and send them to
            # stderr with the bar: a caller's stdout must stay exactly its own
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._bar.add_task(description, total=total)
        self._bar.start()

    def advance(self, count: int) -> None:
        """Count ``count`` more tasks as handed back."""
        self._bar.advance(self._task, count)

    def close(self) -> None:
        """Draw the final state and stop the refresh thread."""
        self._bar.stop()


class NoProgress:
    """Stands in for the bar when none is asked for: every call does nothing."""

    def advance(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


NO_PROGRESS = NoProgress()


class KeptOpen:
    """A bar that a run advances but leaves open: it spans several runs, and its owner
    closes it (``mode="auto"`` moving the rest of an input to another mode)."""

    def __init__(self, bar: Progress) -> None:
        self._bar = bar

    def advance(self, count: int) -> None:
        self._bar.advance(count)

    def close(self) -> None:
        pass


def progress_for(setting: bool | str, mode: str, total: int | None) -> ProgressBar | NoProgress:
    """Return a progress bar if ``setting`` asks for one (a string names it)."""
    if not setting:
        return NO_PROGRESS
    description = setting if isinstance(setting, str) else f"escala · {mode}"
    return ProgressBar(description, total)
