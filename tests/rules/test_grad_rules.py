"""Gradient rules on real induced problems: dead units, unused parameters, explosions, vanishing, decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.rules._helpers import alarms, describe, every_step, first_at, found, train


class ReluMLP(nn.Module):
    """16 -> 64 -> ReLU -> 4, with module names a finding can point at."""

    def __init__(self, d_in: int = 16, hidden: int = 64, d_out: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_dead_relus_from_a_large_negative_bias(tmp_path):
    model = ReluMLP()
    with torch.no_grad():
        model.fc1.bias[:40] = -20.0  # 40 of 64 units can never fire: dead from step 0
    run = train(model, tmp_path / "r", 6)
    dead = found(run, "act.dead_features", "act", "critical")
    assert dead, describe(run)
    assert dead[0].first_step == 0
    assert dead[0].worst_value >= 40 / 64 - 1e-6
    zeros = found(run, "grad.zero_fraction", severity="critical")
    assert {f.target for f in zeros} >= {"fc1.weight", "fc1.bias"}, describe(run)
    assert all(f.target.startswith(("fc1.", "fc2.")) for f in zeros)
    hint = zeros[0].hint.lower()
    assert "layernorm" in hint and "learning rate" in hint


def test_dead_relus_from_a_very_high_learning_rate(tmp_path):
    """Non-centred inputs (the field note's raw features): SGD at lr 0.1 kills every unit within 3 steps."""

    def batch(step):  # features with mean 2, a target far below the initial output
        return torch.randn(32, 16, generator=torch.Generator().manual_seed(step)) + 2.0, torch.full(
            (32, 4), -50.0
        )

    def run(lr, out):
        torch.manual_seed(1)
        model = ReluMLP()
        return train(model, tmp_path / out, 6, opt=torch.optim.SGD(model.parameters(), lr=lr), batch=batch)

    high = run(0.1, "high")
    dead = found(high, "act.dead_features", "act", "critical")
    assert dead and first_at(high, "act.dead_features", "act", "critical") >= 1, describe(high)  # the updates
    assert found(high, "grad.zero_fraction", "fc1.weight", "critical"), describe(high)
    assert "learning rate" in dead[0].hint
    low = run(1e-3, "low")  # same init and data: about a fifth of the units idle in a batch, none killed
    assert not found(low, "act.dead_features", "act", "critical"), describe(low)


def test_unused_parameter_is_missing(tmp_path):
    class WithSpare(ReluMLP):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(16, 16)  # defined, never called

    run = train(WithSpare(), tmp_path / "r", 4)
    miss = found(run, "grad.missing", severity="critical")
    assert {f.target for f in miss} == {"spare.weight", "spare.bias"}, describe(run)
    assert miss[0].first_step == 0  # opened (as a warning) at the first sampled step
    assert "never called" in miss[0].message
    assert not found(run, "grad.missing", "fc1.weight")


def test_detached_branch_is_missing_and_says_the_module_ran(tmp_path):
    class Detached(ReluMLP):
        def __init__(self):
            super().__init__()
            self.side = nn.Linear(16, 4)

        def forward(self, x):
            return super().forward(x) + self.side(x).detach()

    run = train(Detached(), tmp_path / "r", 4)
    miss = found(run, "grad.missing", "side.weight", "critical")
    assert miss, describe(run)
    assert "ran in forward" in miss[0].message


def test_learning_rate_of_ten_spikes_the_gradient_norm(tmp_path):
    model = ReluMLP()
    run = train(model, tmp_path / "r", 8, opt=torch.optim.Adam(model.parameters(), lr=10.0))
    spikes = found(run, "grad.norm_spike")
    assert spikes, describe(run)
    assert spikes[0].first_step <= 2
    assert spikes[0].target == ""  # the total norm is the whole model's: the root module
    assert spikes[0].data["culprit"] in {n for n, _ in model.named_parameters()}
    assert "learning rate" in spikes[0].hint and "max_grad_norm" in spikes[0].hint


def test_backward_born_nan_is_a_gradient_finding(tmp_path):
    class NormAtZero(ReluMLP):
        def forward(self, x):
            h = self.fc1(x)
            # sqrt(0) is finite, its derivative is not: 0 * inf = NaN, born in backward
            return self.fc2(self.act(h)) + torch.sqrt((h - h.detach()).pow(2).sum())

    run = train(NormAtZero(), tmp_path / "r", 3)
    bad = found(run, "grad.nonfinite", severity="critical")
    assert {f.target for f in bad} >= {"fc1.weight"}, describe(run)
    assert "born in backward" in bad[0].hint
    # step 0's forward was finite; from step 1 the NaN update has corrupted fc1's weights, and the
    # forward finding says so instead of pretending fc1's forward is where the NaN was born
    later = found(run, "numerics.nonfinite")
    assert all(f.first_step >= 1 for f in later)
    assert all("weights are already non-finite" in f.message for f in later), describe(run)


class Residual(nn.Module):
    """x -> inp -> h + scale * branch(h) -> out: ``scale`` starves the branch's gradients."""

    def __init__(self, scale: float):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.branch = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
        self.out = nn.Linear(32, 4)
        self.scale = scale

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + self.scale * self.branch(h))


def test_vanishing_gradient_on_a_scaled_down_branch(tmp_path):
    run = train(Residual(1e-6), tmp_path / "r", 5)
    van = found(run, "grad.vanishing", severity="critical")
    targets = {t for f in van for t in f.members or [f.target]}  # aggregated findings count per member
    assert targets >= {"branch.0.weight", "branch.2.weight"}, describe(run)
    assert all(t.startswith("branch.") for t in targets)
    assert not found(run, "grad.vanishing", "inp.weight")


def test_healthy_residual_has_no_gradient_alarm(tmp_path):
    run = train(Residual(1.0), tmp_path / "r", 30)
    assert not alarms(run), describe(run)


def test_progressive_death_is_caught_before_the_zero_fraction_threshold(tmp_path):
    """Units die one by one (the playbook's pattern): grad.dead_trend opens before grad.zero_fraction."""
    model = ReluMLP(hidden=200)

    def kill_more(step: int) -> None:
        with torch.no_grad():  # one more unit per step gets a bias it cannot come back from
            model.fc1.bias[:step] = -50.0

    run = train(model, tmp_path / "r", 40, before_step=kill_more, lr=1e-3)
    trend = found(run, "grad.dead_trend", "fc1.weight")
    level = found(run, "grad.zero_fraction", "fc1.weight")
    assert trend and level, describe(run)
    assert trend[0].first_step < level[0].first_step, describe(run)
    # opened while the level was still under the zero-fraction warning (5 %)
    opened = next(e for e in run.events if e["id"] == trend[0].id and e["event"] == "open")
    assert opened["data"]["zero_fraction"] < 0.05, opened


def test_known_normal_zeros_are_silent_and_explained_on_request(tmp_path):
    """nn.MultiheadAttention's in_proj_bias: a third (the key bias) gets exactly zero gradient."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, idx):
            h = self.emb(idx)
            return self.head(self.attn(h, h, h, need_weights=False)[0]).mean(1)

    def batch(step):
        g = torch.Generator().manual_seed(step)
        return torch.randint(0, 10, (8, 12), generator=g), torch.randn(8, 4, generator=g)  # rows 10+ unused

    model = Attn()
    run = train(model, tmp_path / "r", 8, batch=batch, config=every_step(rules={"explain_normal": True}))
    assert not alarms(run), describe(run)
    notes = {f.target: f for f in run.findings if f.severity == "info"}
    assert "33 % zeros in in_proj_bias" in notes["attn.in_proj_bias"].message  # the key third: normal
    assert "emb.weight" in notes and "absent from the batch" in notes["emb.weight"].message


def test_key_bias_share_is_taken_out_but_the_rest_still_counts(tmp_path):
    """If the q and v parts of a fused bias die too, the finding fires and says the key third is normal."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            out = self.attn(x, x, x, need_weights=False)[0]
            return out[..., :4] * 0.0 + x[..., :4]  # nothing but the input reaches the loss

    run = train(Attn(), tmp_path / "r", 3, batch=lambda s: (torch.randn(4, 6, 16), torch.randn(4, 6, 4)))
    zf = found(run, "grad.zero_fraction", "attn.in_proj_bias")
    assert zf and math.isclose(zf[0].worst_value, 1.0), describe(run)
    own = zf[0].data.get("messages", {}).get("attn.in_proj_bias", zf[0].message)  # its words in an aggregate
    assert "33 %" in own and "key" in own
