"""The one Theil–Sen estimator (stethoscope.trend) against scipy, and both of its users on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from stethoscope import trend
from stethoscope.memory import leak
from stethoscope.rules import _series


@pytest.mark.parametrize("seed", range(8))
def test_theil_sen_matches_scipy_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    x = np.sort(rng.integers(0, 40, n)).astype(float)  # repeated steps too: those pairs have no slope
    if np.unique(x).size < 2:
        x[-1] += 1
    y = 3.0 * x + rng.standard_cauchy(n)  # heavy tails: where a robust slope differs from least squares
    expected = scipy_stats.theilslopes(y, x).slope
    assert trend.theil_sen(x, y) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # both users are the same estimator: the memory-leak check's (x, y) and the rules' (step, value) pairs
    assert leak.theil_sen(x, y) == trend.theil_sen(x, y)
    points = [(int(s), float(v)) for s, v in zip(x, y, strict=True)]
    assert _series.theil_sen(points) == trend.theil_sen(x, y)


def test_theil_sen_edge_cases():
    assert trend.theil_sen([], []) == 0.0
    assert trend.theil_sen([3], [1.0]) == 0.0
    assert trend.theil_sen([2, 2, 2], [1.0, 5.0, 9.0]) == 0.0  # no two distinct steps
    assert trend.theil_sen([0, 1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0, 100.0]) == 1.0  # one outlier does not move it
    assert trend.theil_sen([0, 1, 2, 3], [0.0, 1.0, 1.5, 3.0]) == 1.0  # even count: mean of the middle two
    # a NaN value only removes the pairs it is in
    assert trend.theil_sen([0, 1, 2, 3], [0.0, math.nan, 2.0, 3.0]) == 1.0
    assert math.isnan(trend.theil_sen([0, 1], [math.nan, 1.0]))
    assert _series.theil_sen([]) == 0.0 and _series.theil_sen([(5, 1.0)]) == 0.0
