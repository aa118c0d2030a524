"""Activation rules: the field note's unscaled features, saturated projections, dead units."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.rules._helpers import alarms, describe, every_step, found, train


class PPOish(nn.Module):
    """The field note's shape: raw bar features -> temporal_projection -> GELU -> head."""

    def __init__(self, layer_norm: bool = False):
        super().__init__()
        self.temporal_projection = nn.Linear(8, 32)
        self.act = nn.GELU()
        self.head = nn.Linear(32, 4)
        self.layer_norm = layer_norm

    def forward(self, bar_features):
        if self.layer_norm:  # the playbook's fix
            bar_features = F.layer_norm(bar_features, bar_features.shape[-1:])
        return self.head(self.act(self.temporal_projection(bar_features)))


def prices(step: int):
    """Raw, unnormalised market features: prices around 1000, volumes around 5e4."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 8, generator=g)
    x[:, :4] = 1000 + 20 * x[:, :4]
    x[:, 4:] = 5e4 + 1e3 * x[:, 4:]
    x[:, 7] = 0.0  # a feature the pipeline never fills
    return x, torch.randn(64, 4, generator=g)


def test_unscaled_input_features_are_the_root_cause(tmp_path):
    run = train(PPOish(), tmp_path / "r", 4, batch=prices, lr=1e-3)
    scale = found(run, "act.input_scale", "temporal_projection", "critical")
    assert scale and scale[0].first_step == 0, describe(run)
    assert "mean=" in scale[0].message and "range=" in scale[0].message  # the playbook's INPUT DIAGNOSTICS
    assert "dead features: 1/8" in scale[0].message
    assert "F.layer_norm" in scale[0].hint
    sat = found(run, "act.saturation", "temporal_projection", "critical")
    assert sat and "`act` (gelu)" in sat[0].message, describe(run)


def test_the_playbook_fix_silences_it(tmp_path):
    run = train(PPOish(layer_norm=True), tmp_path / "r", 20, batch=prices, lr=1e-3)
    assert not alarms(run), describe(run)


def test_tanh_saturation_from_a_too_large_init(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.normal_(0, 3.0)  # pre-activations with std ~12: tanh is flat almost everywhere
    run = train(model, tmp_path / "r", 3)
    sat = found(run, "act.saturation", "0", "critical")
    assert sat, describe(run)
    assert "Xavier" in sat[0].hint
    assert not found(run, "act.input_scale")  # the inputs themselves are fine


def test_saturation_modules_can_be_chosen_by_pattern(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.normal_(0, 3.0)
    run = train(model, tmp_path / "r", 2, config=every_step(rules={"saturation_modules": ["0"]}))
    assert found(run, "act.saturation", "0"), describe(run)
    run = train(model, tmp_path / "r2", 2)  # auto: no activation after it, nothing to saturate
    assert not found(run, "act.saturation")


def test_zero_initialised_branch_is_not_dead(tmp_path):
    """LoRA-style: B starts at zero, so its output and A's gradient are exactly zero at step 0."""

    class Lora(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(16, 16)
            self.lora_A = nn.Linear(16, 4, bias=False)
            self.lora_B = nn.Linear(4, 16, bias=False)
            nn.init.zeros_(self.lora_B.weight)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.base(x) + self.lora_B(self.lora_A(x))))

    run = train(Lora(), tmp_path / "r", 6, lr=1e-3)
    assert not alarms(run), describe(run)


def test_dead_features_need_enough_rows(tmp_path):
    """With two rows per step, half of a ReLU's units are zero for both by chance: not called dead."""
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    run = train(
        model,
        tmp_path / "r",
        4,
        batch=lambda s: (torch.randn(2, 16, generator=torch.Generator().manual_seed(s)), torch.randn(2, 4)),
    )
    assert not found(run, "act.dead_features"), describe(run)


def test_secondary_outputs_are_not_units(tmp_path):
    """T5's cross-attention returns (output, position_bias) with a bias of zeros by construction: not dead."""

    class WithBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return torch.tanh(self.proj(x)), torch.zeros(x.shape[0], 8)  # (output, a zero "bias")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(16, 16)
            self.block = WithBias()
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            h, _bias = self.block(self.first(x))
            return self.head(h)

    run = train(Net(), tmp_path / "r", 6, lr=1e-3)
    assert not found(run, "act.dead_features"), describe(run)
    # a dead main output of the same module is still found
    class Dead(WithBias):
        def forward(self, x):
            return torch.relu(self.proj(x)) * 0.0, torch.zeros(x.shape[0], 8)

    net = Net()
    net.block = Dead()
    run = train(net, tmp_path / "r2", 6, lr=1e-3)
    assert [f.target for f in found(run, "act.dead_features")] == ["block"], describe(run)
