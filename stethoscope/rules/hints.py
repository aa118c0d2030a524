"""The playbook's remedies (field note ``gradient-death-troubleshooting``), worded per finding.

Each function returns one clause; rules join the ones that apply to the case at hand, and say when a fix
applies rather than prescribing all of them every time.
"""

from __future__ import annotations

import math

from stethoscope._format import format_float


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a message: ``0.123``, ``1.2e-05``, ``nan``."""
    if x is None:
        return "?"
    return format_float(float(x), digits)


def pct(x: float | None) -> str:
    if x is None or x != x:
        return "nan %"
    return f"{100 * x:.1f} %"


def layernorm(module: str) -> str:
    return (
        f"put a LayerNorm in front of `{module}` (`x = F.layer_norm(x, x.shape[-1:])` before the "
        "projection) — the playbook's recommended fix"
    )


def lower_lr(lr: float | None = None) -> str:
    now = f" (it is {fmt(lr)})" if lr else ""
    return f"lower the learning rate by half{now} and restart from the last good checkpoint"


def clipping(typical: float | None) -> str:
    where = f" ({fmt(typical)} here)" if typical and math.isfinite(typical) else ""
    return (
        "if you clip gradients, check that max_grad_norm is not far below the typical gradient "
        f"norm{where}: the playbook raised it from 1 to 5–10 for their transformer"
    )


def xavier(module: str) -> str:
    return (
        f"re-initialise `{module}` with Xavier and a reduced gain "
        "(`nn.init.xavier_uniform_(w, gain=0.6)`; 0.8 for attention projections)"
    )


def input_scale(module: str) -> str:
    return (
        f"check the scale of the features entering `{module}` (see act.input_scale): the playbook's "
        "root cause was raw features far outside [-3, 3]"
    )


def join(*clauses: str | None) -> str:
    """Clauses as one sentence-ish hint: 'a; b; c.'"""
    parts = [c.strip().rstrip(".") for c in clauses if c]
    if not parts:
        return ""
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."
