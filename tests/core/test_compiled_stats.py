"""The compiled statistics engine (stats.compile) gives the eager engine's numbers, and falls back cleanly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stethoscope.stats import CompiledStats, finalize, tensor_stats


def _close(a, b):
    for key in ("count", "mean", "std", "min", "max", "absmax", "norm", "zero_fraction",
                "saturation_fraction", "nonfinite", "dead_features"):
        x, y = getattr(a, key), getattr(b, key)
        if isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), key
        else:
            assert y == pytest.approx(x, rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_compiled_engine_matches_eager():
    engine = CompiledStats()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, generator=g) * 3 + 1
    x[0, 0, 0] = math.nan
    x[1, 2, 3] = math.inf
    x[..., 2] = 0.0  # a dead feature
    y = torch.randn(4, 9, generator=g)  # a second shape: no recompile needed (dynamic shapes)
    for t, features in ((x, True), (y, True), (x, False)):
        feats: list = []
        raw = engine(t, 1e-8, 3.0, features, feats, None)
        ref = tensor_stats(t, 1e-8, 3.0, features=features)
        width = t.shape[-1] if features else 0
        _close(finalize(ref.numpy(), t.numel(), width), finalize(raw.detach().numpy(), t.numel(), width))
        assert bool(feats) == features
    assert not engine.broken


def test_a_failing_compiler_falls_back_to_eager_once(monkeypatch):
    errors = []
    engine = CompiledStats(on_error=lambda where, exc: errors.append((where, exc)))

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    x = torch.randn(10, 4)
    for _ in range(3):
        raw = engine(x, 1e-8, 3.0, True, [], None)
        np.testing.assert_allclose(raw.numpy(), tensor_stats(x, features=True).numpy())
    assert engine.broken and len(errors) == 1
