"""The demo's model as ``stethoscope replay`` rebuilds it: the same pathology, as it was at the incident's step.

``run_demo`` names :func:`model` as ``incidents.factory`` with its pathology, seed and steps, so the replay line
under a demo incident runs as printed: ``stethoscope replay RUN_DIR/incidents/step-<N>``. A pathology that lives
in module attributes (the ``nan`` one's temperature of 0) is not in the saved weights; this factory sets it.
"""

from __future__ import annotations

from typing import Any

from stethoscope.demo.model import TinyGPT
from stethoscope.demo.runner import build


def model(pathology: str = "none", seed: int = 0, steps: int = 1, manifest: dict | None = None) -> TinyGPT:
    """The demo's TinyGPT with ``pathology`` applied and set for the manifest's step (the replay passes it)."""
    net, _, path = build(pathology, seed)
    step: Any = (manifest or {}).get("step")
    if isinstance(step, int):
        path.before_step(step, steps, net)
    return net
