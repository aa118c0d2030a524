"""Is memory growing steadily? A robust slope over a window, plus a steadiness test.

A leak is growth that goes on step after step, not one jump. Two tests together:

* the Theil–Sen slope (the median of the slopes between every pair of points) — one spike or a few
  outliers barely move it, unlike a least-squares fit;
* steadiness: the window is cut into (up to) four consecutive segments and the median of each must be
  higher than the median of the one before. A single level shift (a bigger batch, the optimizer creating
  its state on the first ``step()``, an evaluation at an epoch boundary) raises one segment only, so it
  fails this test even though it gives a positive slope.

The growth judged against the ``memory.leak`` threshold is ``slope × (steps spanned by the window)``, in MiB.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from stethoscope.rules.thresholds import Threshold, register_threshold
from stethoscope.trend import theil_sen

CODE = "memory.leak"
OOM_CODE = "memory.oom"

# Growth over the window, in MiB: a warning from 32 MiB, critical from 1 GiB.
LEAK_THRESHOLD = Threshold(warning=32.0, critical=1024.0)
GRAPHS = "autograd.graphs"  # the census target: tensors holding an autograd graph that pile up
# A census finding needs this many more graph-holding tensors per step between two censuses (at least 8 in all):
# one per step is `losses.append(loss)`; a model that keeps its last outputs does not grow at all.
CENSUS_PER_STEP = 0.5
register_threshold(
    CODE, LEAK_THRESHOLD, "memory growth over memory.leak_window steps (MiB, Theil-Sen slope x span)"
)


def steady(y: np.ndarray, segments: int = 4) -> bool:
    """True when the median of each of ``segments`` consecutive parts is above the one before."""
    y = np.asarray(y, dtype=np.float64)
    k = min(segments, len(y))
    if k < 3:
        return False
    medians = [float(np.median(part)) for part in np.array_split(y, k)]
    return all(b > a for a, b in itertools.pairwise(medians))


@dataclass
class Growth:
    """The verdict on one window: slope per step, growth over the window (bytes), steadiness."""

    slope: float  # bytes per step
    growth: float  # bytes over the window's span
    steady: bool
    first_step: int
    last_step: int
    level: float  # the latest value (bytes)

    @property
    def growth_mib(self) -> float:
        return self.growth / 2**20


def judge_window(steps: np.ndarray, values: np.ndarray) -> Growth:
    """Theil–Sen slope and steadiness of ``values`` (bytes) over ``steps``."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    slope = theil_sen(steps, values)
    span = float(steps[-1] - steps[0]) if len(steps) > 1 else 0.0
    return Growth(slope, slope * span, steady(values), int(steps[0]), int(steps[-1]), float(values[-1]))
