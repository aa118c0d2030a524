"""The remedies every finding suggests, read from one table: ``hints.yaml`` beside this module.

Why a table: a hint is the line a user acts on, so the hints must be reviewable side by side — contradictions
(one finding calling 1e-3 normal, another too high) and hints that do not fit their target show up in a table,
not in forty f-strings spread over the rules. ``docs/hints.md`` is generated from it
(``python -m stethoscope.rules.hints_doc > docs/hints.md``; a test keeps it current).

A code's hint is one of its *cases* (``default``, or what the producer found: ``checkpoint`` for a parameter
left out by reentrant checkpointing) — a list of clauses joined into one sentence-ish line. A clause is a
template: ``{name}`` takes a parameter the producer passes, or the rendering of a *shared* clause
(``{layernorm}``, ``{lower_lr}``) whose wording depends on the target (no "put a LayerNorm in front" of a
LayerNorm) and is chosen by the selectors below. A clause whose parameter is None, or whose ``if`` flag is
false, is left out; a parameter that is not passed at all is a bug and raises.
"""

from __future__ import annotations

import math
import string
from functools import cache
from importlib import resources
from typing import Any

import yaml

from stethoscope._format import format_float

# The usual upper end of the learning rate: Adam-family optimizers on transformers rarely go past 1e-3
# (3e-4 is the common start; large models use less); plain SGD with momentum rarely past 0.1.
USUAL_MAX_LR = {"adam": 1e-3, "sgd": 0.1}


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a message: ``0.123``, ``1.2e-05``, ``nan``."""
    if x is None:
        return "?"
    return format_float(float(x), digits)


def pct(x: float | None) -> str:
    if x is None or x != x:
        return "nan %"
    return f"{100 * x:.1f} %"


def join(*clauses: str | None) -> str:
    """Clauses as one sentence-ish hint: 'a; b; c.'"""
    parts = [c.strip().rstrip(".") for c in clauses if c]
    if not parts:
        return ""
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------- the table
@cache
def table() -> dict:
    """``hints.yaml`` parsed: ``{"shared": {name: {variant: template}}, "codes": {code: {case: entry}}}``."""
    text = resources.files("stethoscope.rules").joinpath("hints.yaml").read_text(encoding="utf-8")
    return validate(yaml.safe_load(text))


def validate(data: dict) -> dict:
    """``data`` if every clause is text or ``{if, says}``; else a ValueError naming the code and case."""
    for code, cases in data["codes"].items():
        for case, entry in cases.items():
            for clause in entry["says"]:
                # an unquoted "a: b" in YAML reads as a mapping, not as text: say where instead of mis-rendering
                if not (isinstance(clause, str) or (isinstance(clause, dict) and set(clause) == {"if", "says"})):
                    raise ValueError(f"hints.yaml: {code} / {case}: a clause must be text or {{if, says}}, got "
                                     f"{clause!r} (quote a clause that contains ': ')")
    return data


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def shared(name: str, variant: str = "default", **params: Any) -> str | None:
    """One variant of a shared clause, formatted; None when a parameter it names is None."""
    template = table()["shared"][name][variant]
    values = {}
    for f in _fields(template):
        v = params[f]
        if v is None:
            return None
        values[f] = v
    return template.format(**values)


# The selectors: which variant of a shared clause fits this target (``info`` is the rule's ModelInfo, or None).
def _layernorm(p: dict) -> str | None:
    module, info = p.get("module"), p.get("info")
    if module is None:
        return None
    return shared("layernorm", "norm" if info is not None and info.is_norm(module) else "default", module=module)


def _input_scale(p: dict) -> str | None:
    module, info = p.get("module"), p.get("info")
    if module is None or (info is not None and info.is_norm(module)):
        return None
    return shared("input_scale", module=module)


def _xavier(p: dict) -> str | None:
    module, info = p.get("module"), p.get("info")
    if module is None or (info is not None and not info.is_linear(module)):
        return None
    return shared("xavier", module=module)


def _lower_lr(p: dict) -> str:
    """A concrete learning-rate change: far above the usual range, the usual range; else a third of it."""
    lr, info = p.get("lr"), p.get("info")
    if not lr or not math.isfinite(lr):
        return shared("lower_lr", "unknown")
    adam_like = info.adam_like if info is not None and info.optimizer else None
    usual = USUAL_MAX_LR["adam"] if adam_like else USUAL_MAX_LR["sgd"]
    if lr > 10 * usual:
        family = {None: "any", True: "adam", False: "sgd"}[adam_like]
        return shared("lower_lr", "far_above", lr=fmt(lr), usual=shared("usual_lr", family))
    return shared("lower_lr", "third", lr=fmt(lr), lr_third=fmt(lr / 3))


def _clipping(p: dict) -> str:
    typical = p.get("typical")
    where = f" ({fmt(typical)} here)" if typical and math.isfinite(typical) else ""
    return shared("clipping", where=where)


SELECTORS = {
    "layernorm": _layernorm,
    "input_scale": _input_scale,
    "xavier": _xavier,
    "lower_lr": _lower_lr,
    "clipping": _clipping,
}


def clauses(code: str, case: str = "default", **params: Any) -> list[str]:
    """The clauses of ``code``'s hint for ``case``, formatted, those that do not fit left out."""
    try:
        entry = table()["codes"][code][case]
    except KeyError:
        raise KeyError(f"hints.yaml has no hint for {code!r} case {case!r}") from None
    out = []
    for clause in entry["says"]:
        if isinstance(clause, dict):
            if not params[clause["if"]]:
                continue
            clause = clause["says"]
        values: dict[str, Any] = {}
        for f in _fields(clause):
            if f in params:
                v = params[f]
            elif f in SELECTORS:
                v = SELECTORS[f](params)
            else:
                raise KeyError(f"the hint for {code!r} case {case!r} needs the parameter {f!r}")
            if v is None:
                break
            values[f] = v
        else:
            out.append(clause.format(**values))
    return out


def hint(code: str, case: str = "default", **params: Any) -> str:
    """``code``'s hint for ``case`` as one line: its clauses joined ('A; b; c.')."""
    return join(*clauses(code, case, **params))
