"""Fixtures for routing health and output logits: quiet console, one thread, seeded."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console

QUIET = {"console": {"quiet": True}, "sampling": {"warmup_steps": 100}, "watchdog": {"enabled": False},
         "trace": {"profile": False}, "attention": {"capture": "off"}, "incidents": {"enabled": False}}


@pytest.fixture(autouse=True)
def _moe_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("STETHOSCOPE_DISABLE", raising=False)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_console(Console(file=io.StringIO(), width=160, color_system=None))
    yield
    set_console(None)
    torch.set_num_threads(threads)
