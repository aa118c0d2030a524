"""Attention and prediction introspection (docs/attention.md).

* the monitor's attention extension (:mod:`.extension`) captures attention probabilities on sampled steps,
  writes per-head entropy and sink share to the metrics and checks the invariants (``attn.*`` findings);
* :func:`step_by_step` prints and writes one short sequence's attention computation layer by layer and head by
  head, then the loss and the top-k next tokens (``stethoscope trace MODEL_DIR --text ... --attention``);
* :func:`check_causality` changes future tokens and checks that earlier outputs do not move.

Names are imported on first use, so ``import stethoscope.attention`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "step_by_step": "stethoscope.attention.stepwise",
    "StepByStep": "stethoscope.attention.stepwise",
    "check_causality": "stethoscope.attention.perturb",
    "CausalityCheck": "stethoscope.attention.perturb",
    "AttentionCall": "stethoscope.attention.capture",
    "head_statistics": "stethoscope.attention.checks",
    "summarize": "stethoscope.attention.checks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stethoscope.attention' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
