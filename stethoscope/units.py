"""The unit of each finding code's value and threshold, in one table, and how a value reads with it.

``findings.jsonl`` keeps plain numbers (a fraction is ``0.25``, a ratio ``12.0``); what people read — the
console summary, ``stethoscope findings``, ``report.md`` and ``report.html`` — says what the number counts:
``100.0 %`` of the features, ``12×`` the running median, ``10 steps`` in a row, ``3 entries``. A code that is
not in the table (a custom rule) shows its number as it is.

>>> with_unit("act.dead_features", 1.0), with_unit("grad.missing", 10), with_unit("grad.norm_spike", 12.5)
('100.0 %', '10 steps', '12.5×')
"""

from __future__ import annotations

import math
from typing import Any

from stethoscope._format import format_percent, format_value

PERCENT = "%"  # a fraction in [0, 1], shown as a percentage
TIMES = "×"  # a ratio or a factor
# anything else is a count or a measure, spelled after the number ("10 steps", "1 step", "512 MiB")

UNITS: dict[str, str] = {
    "grad.zero_fraction": PERCENT,  # share of the gradient's entries that are zero
    "grad.missing": "steps",  # sampled steps in a row without a gradient
    "grad.nonfinite": "entries",  # non-finite gradient entries
    "grad.norm_spike": TIMES,  # total norm / running median
    "grad.vanishing": TIMES,  # gradient RMS / its peers' (or the model's) median
    "grad.dead_trend": PERCENT,  # rise of the zero fraction over the window (percentage points)
    "act.saturation": PERCENT,
    "act.dead_features": PERCENT,
    "act.input_scale": PERCENT,
    "numerics.nonfinite": "entries",
    "update.ratio": TIMES,  # ‖Δw‖ / ‖w‖
    "amp.skips": PERCENT,  # share of the last scaler steps that were skipped
    "amp.scale_collapse": TIMES,  # the loss scale (a multiplier); "falling" counts steps (see unit_of)
    "logits.divergence": "nats",  # drift of the mean logit or log Z from the run's start
    "moe.load_imbalance": TIMES,  # the busiest expert's load / the mean load
    "moe.dead_expert": PERCENT,  # share of the layer's experts that received no token over the window
    "moe.router_entropy": PERCENT,  # entropy of the mean routing distribution, 0 at log k, 1 at log(experts)
    "moe.router_logits": "nats",  # RMS over tokens of the router's log Z (the ST-MoE router z-loss is its square)
    "attn.row_sum": "",  # |row sum - 1|: a probability, without unit
    "attn.causal_leak": PERCENT,  # share of a row's attention on future keys
    "attn.padding_leak": PERCENT,
    "attn.sink": PERCENT,
    "attn.entropy_collapse": PERCENT,  # share of the layer's heads
    "attn.logit_growth": "",  # the largest pre-softmax logit q·k·scaling: a logit, without unit
    "memory.leak": "MiB",  # growth over the window
    "memory.oom": "MiB",  # the allocation that failed
    "hang.stall": "s",
    "monitor.storage": "MB",
    "perf.input_bound": PERCENT,  # share of the wall clock spent waiting for the next batch
    "perf.monitor_overhead": PERCENT,  # share of the wall clock spent in stethoscope
    "dist.straggler": TIMES,  # a phase's median / the median rank's
    "preflight.init_scale": TIMES,  # weight std / 1/sqrt(fan_in)
    "preflight.param_missing": "parameters",
    "preflight.param_duplicate": "parameters",
    "preflight.param_frozen": "parameters",
    "preflight.vocab_size": "tokens",
}

_SINGULAR = {"steps": "step", "entries": "entry", "parameters": "parameter", "tokens": "token",
             "tensors": "tensor"}


def unit_of(code: str, target: str | None = None, data: dict | None = None, value: Any = None) -> str:
    """The unit of ``code``'s value ("" when it has none). ``target``, ``data`` and ``value`` pick the unit of a
    code whose findings measure two things: the loss scale's fall counted in steps, the autograd-graph census
    of ``memory.leak`` counted in tensors."""
    data = data or {}
    if code == "amp.scale_collapse" and value is not None and "falling" in data and data.get("falling") == value \
            and data.get("scale") != value:
        return "steps"
    if code == "memory.leak" and target == "autograd.graphs":
        return "tensors"
    return UNITS.get(code, "")


def format_with(value: Any, unit: str) -> str:
    """``value`` as a table cell with ``unit`` (``—`` for None; a value that is not a number as it is)."""
    if isinstance(value, str) and value in ("inf", "-inf"):  # how findings.jsonl spells an infinity
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not unit:
        return format_value(value)
    if unit == PERCENT:
        return format_percent(value) if math.isfinite(value) else format_value(value)
    if unit == TIMES:
        return f"{format_value(value)}×"
    if unit in _SINGULAR and value == 1:
        return f"1 {_SINGULAR[unit]}"
    return f"{format_value(value)} {unit}"


def with_unit(code: str, value: Any, target: str | None = None, data: dict | None = None,
              unit_value: Any = None) -> str:
    """``value`` of a ``code`` finding with its unit. ``unit_value`` (default ``value``) is the number that
    tells a two-unit code's unit apart — a threshold is shown in the unit of the value it goes with."""
    return format_with(value, unit_of(code, target, data, value if unit_value is None else unit_value))
