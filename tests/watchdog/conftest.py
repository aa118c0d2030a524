"""Fixtures for the watchdog tests: a console buffer, seeded torch, short thresholds."""

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
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=120, color_system=None))
    yield buffer
    set_console(None)


def watchdog_config(stall: float = 300.0, first: float | None = None, repeat: float = 300.0, **extra) -> dict:
    """A config with thresholds short enough for a test (the poll interval scales with them)."""
    wd = {
        "stall_seconds": stall,
        "first_call_stall_seconds": first if first is not None else stall,
        "repeat_seconds": repeat,
        **extra,
    }
    return {"watchdog": wd, "console": {"quiet": True}}
