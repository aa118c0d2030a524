"""Fixtures for the health-rule tests: a quiet console, one thread, and a small training-loop helper."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console


@pytest.fixture(autouse=True)
def _rules_env(monkeypatch: pytest.MonkeyPatch):
    """Seeded, monitor enabled, console into a buffer, one thread (tiny tensors; a loaded machine).

    The end-of-run report (HTML, figures) is the report's own tests' business and costs about a second per
    ``close()``; these tests read findings and ``meta.json``, so it is skipped here (a test that wants it
    calls ``stethoscope.report.write_report`` itself, imported before this fixture runs).
    """
    import stethoscope.report

    monkeypatch.setattr(stethoscope.report, "write_report", lambda *args, **kwargs: None)
    monkeypatch.delenv("STETHOSCOPE_DISABLE", raising=False)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_console(Console(file=io.StringIO(), width=100, color_system=None))
    yield
    set_console(None)
    torch.set_num_threads(threads)
