"""The one robust trend estimator (Theil–Sen) the health rules and the memory-leak check share.

A leaf module: numpy only, nothing from stethoscope, so any part of the package may import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def theil_sen(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """The median of the pairwise slopes ``(y[j] - y[i]) / (x[j] - x[i])`` over the pairs with ``x[j] != x[i]``.

    One outlier (or a few) barely moves it, unlike a least-squares fit. Returns 0.0 when fewer than two
    points have distinct ``x``; NaN slopes (a NaN value, or ``inf - inf``) say nothing and are left out, so
    the result is NaN only when every slope is. Equal to ``scipy.stats.theilslopes(y, x).slope`` on finite
    data.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return 0.0
    i, j = np.triu_indices(x.size, k=1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        dx = x[j] - x[i]
        keep = dx != 0
        if not keep.any():
            return 0.0
        slopes = (y[j] - y[i])[keep] / dx[keep]
        slopes = slopes[~np.isnan(slopes)]
        return float(np.median(slopes)) if slopes.size else math.nan
