"""update.ratio: the learning rate against what one step does to each weight."""

from __future__ import annotations

import torch
from torch import nn

from tests.rules._helpers import alarms, describe, found, train


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def test_learning_rate_far_too_high(tmp_path):
    model = mlp()
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    run = train(model, tmp_path / "r", 4, opt=torch.optim.AdamW(model.parameters(), lr=10.0))
    high = found(run, "update.ratio", "0.weight", "critical")
    assert high, describe(run)
    assert "implies a ratio" in high[0].message and "too high" in high[0].message
    assert "the learning rate is 10, far above the usual range" in high[0].hint.lower()
    # zero-initialised biases: Adam's fixed step against a zero norm is normal, not a finding
    assert not found(run, "update.ratio", "0.bias")


def test_learning_rate_far_too_low(tmp_path):
    model = mlp()
    run = train(model, tmp_path / "r", 4, opt=torch.optim.Adam(model.parameters(), lr=1e-10))
    low = found(run, "update.ratio", "0.weight", "critical")
    assert low and "too low" in low[0].message, describe(run)


def test_parameter_left_out_of_the_optimizer(tmp_path):
    model = mlp()
    opt = torch.optim.Adam(list(model[0].parameters()), lr=1e-3)  # forgot the last layer
    run = train(model, tmp_path / "r", 2, opt=opt)
    out = found(run, "update.ratio", "2.weight", "critical")
    assert out and "no optimizer param group" in out[0].message, describe(run)
    assert not found(run, "update.ratio", "0.weight")


def test_warmup_at_zero_learning_rate_is_silent(tmp_path):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s < 3 else 1.0)
    run = train(model, tmp_path / "r", 6, opt=opt, before_step=lambda s: sched.step() if s else None)
    assert not alarms(run), describe(run)
