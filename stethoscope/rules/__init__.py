"""Health rules: read each flushed :class:`~stethoscope.record.StepRecord` and open/close findings.

The monitor calls :func:`default_rules` once when it is built and then drives each rule through
``observe(record)``, ``finish(last_step)``, ``state_dict()`` / ``load_state_dict()`` and ``detach()``.
Every rule — the built-in ones too — is a :class:`Rule` registered with :func:`register_rule`; its
thresholds resolve the config's per-name-pattern overrides through one :class:`ThresholdResolver`.
``docs/rules.md`` shows how to write your own; ``docs/findings.md`` documents every code.
"""

from __future__ import annotations

from typing import Any

from stethoscope.naming import make_filter, patterns

# The built-in rules register themselves on import (their run order is their ``order`` attribute).
from stethoscope.rules import acts, amp, grads, numerics, updates  # noqa: F401  (registration)
from stethoscope.rules.base import (
    Rule,
    RuleContext,
    RulesSettings,
    register_rule,
    registered_rules,
    unregister_rule,
)
from stethoscope.rules.model_info import ModelInfo, ParamInfo
from stethoscope.rules.thresholds import (
    Threshold,
    ThresholdResolver,
    check_rule_name,
    register_threshold,
    resolve_threshold,
    threshold_keys,
)

BUILTIN_CODES = tuple(registered_rules())

__all__ = [
    "BUILTIN_CODES",
    "ModelInfo",
    "ParamInfo",
    "Rule",
    "RuleContext",
    "RulesSettings",
    "Threshold",
    "ThresholdResolver",
    "check_rule_name",
    "default_rules",
    "register_rule",
    "register_threshold",
    "registered_rules",
    "resolve_threshold",
    "threshold_keys",
    "unregister_rule",
]


def default_rules(run: Any) -> list[Rule]:
    """The registered rules the config enables, built over ``run`` (the monitor's
    :class:`~stethoscope.monitor.context.RunContext`).

    The model and optimizer are inspected here, once, into plain data; no rule keeps a reference to them.
    A rule that fails to build is reported as ``monitor.error`` and left out; the rest still run.
    """
    try:
        ctx = run.rule_context
    except Exception as exc:  # never break the training we watch
        run.record_error("rules (inspecting the model)", exc)
        return []
    section = getattr(run.config, "rules", None)
    enabled = make_filter(patterns(getattr(section, "enabled", "*")))
    disabled = make_filter(patterns(getattr(section, "disabled", "")))
    rules: list[Rule] = []
    for code, cls in registered_rules().items():
        if not enabled(code) or disabled(code):
            continue
        try:
            rules.append(cls(ctx))
        except Exception as exc:
            run.record_error(f"rule {code} (setup)", exc)
    return rules
