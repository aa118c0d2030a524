"""A progress bar for the comparison's forwards (rich, on a terminal; silent elsewhere and with
``progress=False``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class _Bar:
    def __init__(self, progress: Any):
        self.progress, self.task = progress, None

    def phase(self, text: str, total: int | None) -> None:
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(text, total=total)

    def advance(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[_Bar]:
    """``bar.phase(text, total)`` starts a stage (total None: a spinner); ``bar.advance()`` one step of it."""
    from stethoscope.console import get_console

    console = get_console()
    if not enabled or not console.is_terminal:
        yield _Bar(None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        yield _Bar(progress)
