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


# The usual upper end of the learning rate: Adam-family optimizers on transformers rarely go past 1e-3
# (3e-4 is the common start; large models use less); plain SGD with momentum rarely past 0.1.
USUAL_MAX_LR = {"adam": 1e-3, "sgd": 0.1}


def lower_lr(lr: float | None = None, adam_like: bool | None = None) -> str:
    """A concrete learning-rate change: far above the usual range, the usual range; else a third of it.

    ``adam_like``: the optimizer is Adam-family (True), plain SGD-like (False) or unknown (None)."""
    if not lr or not math.isfinite(lr):
        return "lower the learning rate (a third of it is a good first try) and restart from the last good checkpoint"
    usual = {True: USUAL_MAX_LR["adam"], False: USUAL_MAX_LR["sgd"], None: USUAL_MAX_LR["sgd"]}[adam_like]
    if lr > 10 * usual or (adam_like is None and lr > 10 * USUAL_MAX_LR["adam"] and lr > 1):
        if adam_like is None:
            usual_text = "1e-3 or lower for Adam/AdamW on a transformer, 3e-4 a common start, 0.1 or lower for SGD"
        elif adam_like:
            usual_text = "1e-3 or lower for Adam/AdamW on a transformer, 3e-4 a common start"
        else:
            usual_text = "0.1 or lower for SGD"
        return (f"the learning rate is {fmt(lr)}, far above the usual range ({usual_text}): set it there and restart "
                "from the last good checkpoint")
    return f"lower the learning rate from {fmt(lr)} to about {fmt(lr / 3)} and restart from the last good checkpoint"


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
