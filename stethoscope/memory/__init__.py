"""Memory: per-step readings, leak detection with live-tensor snapshots, and out-of-memory context.

See ``docs/memory.md``. The monitor builds it through :mod:`stethoscope.memory.extension`; the pieces are
usable alone: :func:`~stethoscope.memory.tensors.snapshot` / :func:`~stethoscope.memory.tensors.compare`
(what accumulates between two moments), :func:`~stethoscope.memory.leak.judge_window` (robust growth),
:func:`~stethoscope.memory.oom.is_oom`.
"""

from __future__ import annotations

from stethoscope.memory.leak import judge_window, steady, theil_sen
from stethoscope.memory.oom import is_oom
from stethoscope.memory.readings import RssReader, cuda_figures
from stethoscope.memory.tensors import compare, snapshot

__all__ = ["RssReader", "compare", "cuda_figures", "is_oom", "judge_window", "snapshot", "steady", "theil_sen"]
