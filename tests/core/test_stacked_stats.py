"""Small tensors of one length summarised stacked (stats.stacked_stats), against the naive reference.

A model's LayerNorm and bias gradients are read as one (k, n) block, every pass once for all of them: each
row must be as exact over its own finite entries as the tensor summarised alone.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st_

import stethoscope.stats as stats_mod
from stethoscope.stats import RAW_WIDTH, finalize

from .test_stats import _SETTINGS, EPS, SAT, _elements, assert_matches, reference


@settings(max_examples=60, **_SETTINGS)
@given(
    hnp.arrays(np.float32, st_.tuples(st_.integers(1, 6), st_.integers(1, 9)), elements=_elements),
    st_.sampled_from([0.0, EPS]),
)
def test_stacked_rows_match_the_reference_row_by_row(values, eps):
    # k small tensors of one length (a model's LayerNorm and bias gradients) in one (k, n) pass: each row
    # as exact over its own finite entries as the tensor alone
    rows = stats_mod.stacked_stats(torch.from_numpy(values.copy()), eps, SAT)
    assert rows.shape == (values.shape[0], RAW_WIDTH)
    for i in range(values.shape[0]):
        got = finalize(rows[i].numpy(), values.shape[1]).as_dict()
        assert_matches(got, reference(values[i], eps=eps, features=False))


@pytest.mark.parametrize("scale", [1e35, 1e-40, 1.0])
def test_stacked_rows_of_extreme_magnitudes_and_half_inputs(scale):
    base = torch.tensor([[1.0, -1.0, 3.0, 0.5, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [1e3, 1e3 + 1, math.nan, 0.0, -4.0]])
    for x in (base * scale, (base * scale).to(torch.float16) if scale == 1.0 else None):
        if x is None:
            continue
        rows = stats_mod.stacked_stats(x, EPS, SAT)
        for i in range(3):
            got = finalize(rows[i].numpy(), 5).as_dict()
            ref = reference(x[i].float().numpy(), features=False)
            assert_matches(got, ref)
            assert math.isfinite(got["std"])
