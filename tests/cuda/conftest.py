"""CUDA tests (issue 17, item 6): each is marked ``cuda`` and skips cleanly where no GPU is present.

Run them on a GPU machine with ``pytest -m cuda tests/cuda`` or ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def quiet_console(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("STETHOSCOPE_DISABLE", raising=False)
    set_console(Console(file=io.StringIO(), width=120, color_system=None))
    yield
    set_console(None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
