"""Where a step's time goes (data wait, forward, backward, optimizer, the monitor itself) and which rank is
slower than its peers: the ``perf`` extension (docs/perf.md, docs/distributed.md)."""

from stethoscope.perf.phases import PHASES, PhaseWindow, StepStamps

__all__ = ["PHASES", "PhaseWindow", "StepStamps"]
