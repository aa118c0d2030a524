"""The remedies, worded per finding and per target.

Each function returns one clause — or None when it does not fit the target (no "put a LayerNorm in front" of a
LayerNorm, no Xavier re-initialisation of a module without a weight matrix) — and says why it helps. Rules join
the ones that apply to the case at hand (:func:`join` drops the Nones). A hint names no document the user
cannot open: the reasoning is in the sentence.
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


def layernorm(module: str, info=None) -> str | None:
    """Normalise what enters ``module``; for a normalisation layer itself, say what its scale means instead."""
    if info is not None and info.is_norm(module):
        return (f"`{module}` is itself a normalisation layer: large outputs mean its gain (`{module}.weight`) "
                "grew; check that weight and the learning rate, and whether weight decay excludes it")
    return (
        f"put a LayerNorm in front of `{module}` (`x = F.layer_norm(x, x.shape[-1:])` before the projection): "
        "it keeps the pre-activations at unit scale whatever the upstream features do"
    )


# The usual upper end of the learning rate: Adam-family optimizers on transformers rarely go past 1e-3
# (3e-4 is the common start; large models use less); plain SGD with momentum rarely past 0.1.
USUAL_MAX_LR = {"adam": 1e-3, "sgd": 0.1}


def lower_lr(lr: float | None = None, info=None) -> str:
    """A concrete learning-rate change: far above the usual range, the usual range; else a third of it.

    ``info``: the rule's :class:`~stethoscope.rules.model_info.ModelInfo`, for the optimizer family (Adam-like,
    SGD-like, or unknown without an optimizer)."""
    if not lr or not math.isfinite(lr):
        return "lower the learning rate (a third of it is a good first try) and restart from the last good checkpoint"
    adam_like = info.adam_like if info is not None and info.optimizer else None
    usual = USUAL_MAX_LR["adam"] if adam_like else USUAL_MAX_LR["sgd"]
    if lr > 10 * usual:
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
        f"norm{where}: clipping every step at a fraction of it shrinks every update (5–10 is common for a "
        "transformer trained with a norm of a few units)"
    )


def xavier(module: str, info=None) -> str | None:
    """Re-initialise a weight matrix; None for a module that has none (a norm, an activation)."""
    if info is not None and not info.is_linear(module):
        return None
    return (
        f"re-initialise `{module}` with Xavier and a reduced gain "
        "(`nn.init.xavier_uniform_(w, gain=0.6)`; 0.8 for attention projections) so its outputs start small"
    )


def input_scale(module: str, info=None) -> str | None:
    if info is not None and info.is_norm(module):
        return None
    return (
        f"check the scale of the features entering `{module}` (see act.input_scale): raw features far outside "
        "[-3, 3] push pre-activations into the flat parts of the activation, where units stop learning"
    )


def join(*clauses: str | None) -> str:
    """Clauses as one sentence-ish hint: 'a; b; c.'"""
    parts = [c.strip().rstrip(".") for c in clauses if c]
    if not parts:
        return ""
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."
