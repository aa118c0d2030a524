"""Which steps get full statistics: plain ``step -> bool`` schedules, plus anomaly-triggered sampling.

Following cockpit, a schedule is just a callable. The config's ``sampling`` section builds the default one
(the first ``warmup_steps`` steps, then every ``every``-th). An anomaly — a non-finite loss, a loss or
gradient-norm spike against a robust running median — samples the next ``after_anomaly`` steps in full.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - annotations only: this module is a leaf (rules import it)
    from stethoscope.config import SamplingConfig

Schedule = Callable[[int], bool]


class DefaultSchedule:
    """The first ``warmup_steps`` steps, then every ``every``-th step (step 0 counts as the first)."""

    def __init__(self, warmup_steps: int = 10, every: int = 50):
        self.warmup_steps = warmup_steps
        self.every = every

    def __call__(self, step: int) -> bool:
        return step < self.warmup_steps or step % self.every == 0

    def __repr__(self) -> str:
        return f"DefaultSchedule(warmup_steps={self.warmup_steps}, every={self.every})"


def schedule_from_config(cfg: SamplingConfig) -> DefaultSchedule:
    return DefaultSchedule(cfg.warmup_steps, cfg.every)


class SpikeDetector:
    """Flags a value far above the median of its recent history (robust to the odd outlier).

    A value is a spike when it exceeds ``factor`` times the running median of the last ``window`` finite
    values, once at least ``min_history`` values have been seen. Non-finite values are always anomalies.
    """

    def __init__(self, factor: float, window: int = 50, min_history: int = 5):
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history

    def median(self) -> float:
        return float(np.median(self.history)) if self.history else math.nan

    def check(self, value: float) -> bool:
        """Record ``value``; True when it is an anomaly."""
        if not math.isfinite(value):
            return True
        spike = False
        if len(self.history) >= self.min_history:
            med = self.median()
            spike = med > 0 and value > self.factor * med
        if not spike:
            self.history.append(value)
        return spike

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(float(v) for v in state.get("history", []))
