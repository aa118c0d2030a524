"""Thresholds and the one resolver every rule reads them through.

A rule declares default levels per *threshold key* (usually its finding code; ``update.ratio.low`` is the
second key of ``update.ratio``). The config's ``thresholds:`` list overrides them per name pattern::

    thresholds:
      - {pattern: "*temporal_projection*", rule: grad.zero_fraction, warning: 0.15, critical: 0.30}
      - {pattern: "*self_attn.in_proj_*",  rule: grad.zero_fraction, warning: 0.10, critical: 0.20}
      - {pattern: "*mlp*",                 rule: grad.zero_fraction, warning: 0.08, critical: 0.15}

Resolution (:meth:`ThresholdResolver.resolve`): start from the rule's default; every matching entry, in
order, replaces the levels it sets (``warning``, ``critical``; an omitted level is inherited), so the last
matching entry wins. ``pattern`` is a glob over the finding's target and matches the name itself or any
dotted ancestor of it (``"h.0.mlp"`` covers ``h.0.mlp.c_fc.weight``); ``rule`` is a key or a glob of keys
(``"grad.*"``). A level set to ``.inf`` (``-.inf`` for lower-is-worse keys) turns that level off.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

# Every finding code DESIGN.md names, so a threshold for a subsystem that registers its keys lazily is
# still accepted by the config check.
DOCUMENTED_CODES = (
    "grad.zero_fraction",
    "grad.missing",
    "grad.nonfinite",
    "grad.norm_spike",
    "grad.vanishing",
    "grad.dead_trend",
    "act.saturation",
    "act.dead_features",
    "act.input_scale",
    "numerics.nonfinite",
    "update.ratio",
    "update.ratio.low",
    "logits.divergence",
    "moe.load_imbalance",
    "moe.dead_expert",
    "moe.router_entropy",
    "moe.router_logits",
    "attn.row_sum",
    "attn.causal_leak",
    "attn.padding_leak",
    "attn.sink",
    "attn.entropy_collapse",
    "memory.leak",
    "memory.oom",
    "hang.stall",
    "monitor.error",
    "perf.input_bound",
    "perf.monitor_overhead",
    "dist.straggler",
)


@dataclass(frozen=True)
class Threshold:
    """Warning and critical levels of one value. ``None`` (or an infinite level) means that level is off.

    With ``higher_is_worse`` a value at or above a level reaches it; otherwise at or below.

    Example:
        >>> Threshold(0.05, 0.10).severity(0.07)
        'warning'
        >>> Threshold(1e-3, 1e-4, higher_is_worse=False).severity(5e-5)
        'critical'
    """

    warning: float | None
    critical: float | None
    higher_is_worse: bool = True

    def _reaches(self, value: float, level: float | None) -> bool:
        if level is None or math.isnan(level):
            return False
        return value >= level if self.higher_is_worse else value <= level

    def severity(self, value: float | None) -> str | None:
        """'critical', 'warning', or None for a value that reaches neither level (NaN reaches none)."""
        if value is None:
            return None
        v = float(value)
        if math.isnan(v):
            return None
        if self._reaches(v, self.critical):
            return "critical"
        if self._reaches(v, self.warning):
            return "warning"
        return None

    def healthy(self, value: float, factor: float = 1.0) -> bool:
        """True when ``value`` is clear of the lowest active level by ``factor`` (hysteresis for closing).

        ``factor`` < 1 asks for margin: 0.8 means below 80 % of the warning level (or above 125 % of it
        for lower-is-worse values).
        """
        v = float(value)
        if math.isnan(v):
            return False
        levels = [x for x in (self.warning, self.critical) if x is not None and not math.isnan(x)]
        if not levels:
            return True
        if self.higher_is_worse:
            lowest = min(levels)
            return v < lowest * factor if lowest > 0 else v < lowest
        highest = max(levels)
        return v > highest / factor if highest > 0 else v > highest

    @property
    def shown(self) -> float | None:
        """The level a finding quotes as its threshold: the warning level, else the critical one."""
        for level in (self.warning, self.critical):
            if level is not None and math.isfinite(level):
                return level
        return None

    def level(self, severity: str) -> float | None:
        """The level behind a severity (what a finding of that severity is compared against)."""
        return self.critical if severity == "critical" else self.warning


@dataclass(frozen=True)
class ThresholdKey:
    """A registered threshold key: its default levels and one line saying what the value is."""

    key: str
    default: Threshold
    doc: str = ""


_KEYS: dict[str, ThresholdKey] = {}


def register_threshold(key: str, default: Threshold, doc: str = "") -> None:
    """Make ``key`` known to the config check and the resolver (rules do this when registered).

    Other subsystems whose findings are not rules (attention, memory, ...) call it for their own keys so
    that ``thresholds:`` entries naming them validate and resolve the same way.
    """
    if not key or not isinstance(key, str):
        raise ValueError(f"a threshold key must be a non-empty string, got {key!r}")
    _KEYS[key] = ThresholdKey(key, default, doc)


def threshold_keys() -> dict[str, ThresholdKey]:
    """Every registered threshold key (a copy)."""
    return dict(_KEYS)


def default_threshold(key: str) -> Threshold | None:
    spec = _KEYS.get(key)
    return spec.default if spec is not None else None


def check_rule_name(rule: str) -> str:
    """Validate the ``rule`` of a threshold entry: a known key or a glob matching one (else ValueError).

    Used by the config model, so a mistyped rule is a :class:`~stethoscope.errors.ConfigError` naming the
    entry and the closest valid key.
    """
    known = sorted(set(_KEYS) | set(DOCUMENTED_CODES))
    if rule in known or rule.startswith("preflight."):
        return rule
    if any(ch in rule for ch in "*?[") and any(fnmatch.fnmatchcase(k, rule) for k in known):
        return rule
    close = difflib.get_close_matches(rule, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "valid rules: " + ", ".join(known)
    raise ValueError(f"unknown rule {rule!r} in a thresholds entry: {hint}")


def _ancestors(name: str) -> Iterable[str]:
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a`` (the name first)."""
    yield name
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def pattern_matches(pattern: str, target: str | None) -> bool:
    """True when ``pattern`` matches ``target`` or one of its dotted ancestors (``None`` matches ``*``)."""
    if target is None:
        return pattern == "*"
    return any(fnmatch.fnmatchcase(name, pattern) for name in _ancestors(target))


class ThresholdResolver:
    """Resolves the levels of (threshold key, target) against the config's pattern overrides.

    Args:
        overrides: the config's ``thresholds`` entries (objects or dicts with ``pattern``, ``rule``,
            ``warning``, ``critical``), in order.

    Results are cached per (key, target), so a rule may call :meth:`resolve` for every target every step.
    """

    def __init__(self, overrides: Sequence[Any] = ()):
        self._overrides = [self._plain(o) for o in overrides]
        self._cache: dict[tuple[str, str | None, Threshold], Threshold] = {}

    @staticmethod
    def _plain(o: Any) -> tuple[str, str, float | None, float | None]:
        get = o.get if isinstance(o, dict) else lambda k, _o=o: getattr(_o, k, None)
        return str(get("pattern")), str(get("rule")), get("warning"), get("critical")

    def resolve(self, key: str, target: str | None, default: Threshold | None = None) -> Threshold:
        """The levels for ``key`` on ``target``: ``default`` (else the registered default) overridden."""
        if default is None:
            default = default_threshold(key)
            if default is None:
                raise KeyError(f"no default threshold registered for {key!r}")
        cache_key = (key, target, default)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        th = default
        for pattern, rule, warning, critical in self._overrides:
            if not fnmatch.fnmatchcase(key, rule) or not pattern_matches(pattern, target):
                continue
            if warning is not None:
                th = replace(th, warning=float(warning))
            if critical is not None:
                th = replace(th, critical=float(critical))
        self._cache[cache_key] = th
        return th


def resolve_threshold(
    config: Any, key: str, target: str | None, default: Threshold | None = None
) -> Threshold:
    """One-off resolution for code that is not a rule: ``config`` is a :class:`~stethoscope.Config`."""
    return ThresholdResolver(getattr(config, "thresholds", []) or []).resolve(key, target, default)
