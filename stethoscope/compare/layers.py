"""Which module names are layers: the rows of the error-growth table and the ticks of its figure."""

from __future__ import annotations


def is_layer(name: str) -> bool:
    """A row of the error-growth table: the model, its direct children, and each repeated block
    (``transformer.h.3``, ``model.layers.3``, ``encoder.layer.3``)."""
    from stethoscope.report.model import CONTAINERS

    parts = name.split(".") if name else []
    if len(parts) <= 1:
        return True
    return parts[-1].isdigit() and parts[-2] in CONTAINERS
