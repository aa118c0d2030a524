"""The one rich console stethoscope prints through, so ``--quiet`` and tests (fixed width) control it."""

from __future__ import annotations

import sys

from rich.console import Console

_console: Console | None = None


def get_console() -> Console:
    """The shared console (stderr-free: progress and summaries go to stdout)."""
    global _console
    if _console is None:
        _console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    return _console


def set_console(console: Console | None) -> None:
    """Replace the shared console (tests pass ``Console(file=StringIO(), width=100)``); None resets it."""
    global _console
    _console = console


SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
