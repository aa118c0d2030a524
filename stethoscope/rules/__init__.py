"""Health rules: read each flushed :class:`~stethoscope.record.StepRecord` and open/close findings.

The rule set arrives with issue 3; the monitor calls :func:`default_rules` and drives each rule through
``observe(record)``, ``finish(last_step)``, ``state_dict()``, ``load_state_dict()`` and ``detach()``.
"""

from __future__ import annotations

from typing import Any


def default_rules(monitor: Any) -> list[Any]:
    """The built-in rules for ``monitor`` (none until the health rules land)."""
    return []
