"""The monitor: :class:`Monitor` (the step protocol) and :class:`RunContext` (what its components may use).

See :mod:`stethoscope.monitor.core` for the flow and ``docs/architecture.md`` for the picture.
"""

from stethoscope.monitor.context import RunContext
from stethoscope.monitor.core import Monitor

__all__ = ["Monitor", "RunContext"]
