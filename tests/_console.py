"""A shared autouse fixture for test folders that read the console: import it into the folder's conftest.

``console_text``: the monitor enabled (``STETHOSCOPE_DISABLE`` unset), torch seeded on one thread, and
stethoscope's console captured in a buffer the test can read. ``quiet()``: a config that prints nothing and
writes no figures.
"""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console


@pytest.fixture(autouse=True)
def console_text(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("STETHOSCOPE_DISABLE", raising=False)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=120, color_system=None))
    yield buffer
    set_console(None)
    torch.set_num_threads(threads)


def quiet(**sections) -> dict:
    """A config that prints nothing and writes no figures."""
    return {"console": {"quiet": True}, "report": {"plots": False}, **sections}
