"""Fixtures: a console buffer (``console_text``), seeded torch on one thread, the monitor enabled."""

from __future__ import annotations

import gc
import io

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console


@pytest.fixture(autouse=True)
def console_text(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("STETHOSCOPE_DISABLE", raising=False)
    # A monitor an earlier test abandoned inside a reference cycle (a `pytest.raises` traceback holding its
    # frame) keeps the logging levels it lowered until the collector frees it: these tests read the global
    # logging state, so they start from a collected heap.
    gc.collect()
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
