"""Fixtures for the monitor-core tests: a silent console and a clean environment for every test."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console


@pytest.fixture(autouse=True)
def _core_env(monkeypatch: pytest.MonkeyPatch):
    """Every test starts seeded, monitor enabled, printing into a buffer (``console.getvalue()``)."""
    monkeypatch.delenv("STETHOSCOPE_DISABLE", raising=False)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and immune to a loaded machine
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=100, color_system=None))
    yield buffer
    set_console(None)
    torch.set_num_threads(threads)


@pytest.fixture
def console_text(_core_env: io.StringIO) -> io.StringIO:
    """What the monitor printed so far in this test."""
    return _core_env
