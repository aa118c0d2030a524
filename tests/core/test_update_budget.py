"""stats.update_budget_mb: update ratios copy at most a budget of parameters per sampled step (issue 17, item 3).

The ratios that are measured stay exact (checked against a hand-made copy); the others carry ‖w‖ only, write
no metrics row and are not judged by ``update.ratio``.
"""

from __future__ import annotations

import math

import pytest
import torch

import stethoscope as st
from stethoscope.extensions import Extension
from stethoscope.record import StepRecord, UpdateRecord
from stethoscope.rules import updates
from tests.rules.test_rules_unit import ADAM, feed, make, only_open, upd_step

from ._helpers import batch, quiet_config, rows, train

MiB = 2**20
# tiny_mlp: 0.weight 16x8 (512 B), 0.bias 16 (64 B), 2.weight 4x16 (256 B), 2.bias 4 (16 B), in this order
SIZES = {"0.weight": 512, "0.bias": 64, "2.weight": 256, "2.bias": 16}


class Records(Extension):
    """Keeps every flushed StepRecord."""

    name = "test_records"

    def __init__(self):
        self.records: list[StepRecord] = []

    def observe(self, record: StepRecord) -> None:
        self.records.append(record)


def run(model, path, budget, steps=4, lr=1e-2):
    """Adam on the tiny MLP under ``budget`` (MiB); the hand-computed ratios and the records seen."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config(stats={"update_budget_mb": budget}))
    seen = Records()
    mon.add_extension(seen)
    expected = {}
    for step in range(steps):
        x, y = batch(step)
        with mon.step(step):
            (model(x) - y).pow(2).mean().backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
        expected[step] = {n: (before[n].norm().item(), (p.detach() - before[n]).norm().item())
                          for n, p in model.named_parameters()}
    mon.close()
    return expected, seen.records


def test_round_robin_within_the_budget_and_exact(run_dir, tiny_mlp):
    path = run_dir()
    expected, records = run(tiny_mlp, path, 600 / MiB)
    up = rows(path, "update")
    measured = {s: sorted(up[up["step"] == s]["name"]) for s in range(4)}
    # strict round-robin: 0.weight + 0.bias (576 B); 2.weight + 2.bias (272 B; 0.weight would pass 600); again
    assert measured == {0: ["0.bias", "0.weight"], 1: ["2.bias", "2.weight"],
                        2: ["0.bias", "0.weight"], 3: ["2.bias", "2.weight"]}
    for names in measured.values():
        assert sum(SIZES[n] for n in names) <= 600
    for _, row in up.iterrows():
        wn, dn = expected[row["step"]][row["name"]]
        assert row["weight_norm"] == pytest.approx(wn, rel=1e-6)
        assert row["update_norm"] == pytest.approx(dn, rel=1e-5)
        assert row["ratio"] == pytest.approx(dn / wn, rel=1e-5)
    # the record still carries every parameter's ‖w‖; the unmeasured ones say so and have no ratio
    by_step = {r.step: r for r in records}
    for s in range(4):
        ups = by_step[s].updates
        assert set(ups) == set(SIZES)
        for name, u in ups.items():
            assert u.weight_norm == pytest.approx(expected[s][name][0], rel=1e-6)
            assert u.measured is (name in measured[s])
            if not u.measured:
                assert math.isnan(u.update_norm) and math.isnan(u.ratio)


def test_a_parameter_larger_than_the_budget_is_measured_alone(run_dir, tiny_mlp):
    path = run_dir()
    run(tiny_mlp, path, 0.0, steps=5)
    up = rows(path, "update")
    assert [list(up[up["step"] == s]["name"]) for s in range(5)] == [
        ["0.weight"], ["0.bias"], ["2.weight"], ["2.bias"], ["0.weight"]]


@pytest.mark.parametrize("budget", [None, 1.0])
def test_no_bound_or_a_budget_that_fits_measures_everything(run_dir, tiny_mlp, budget):
    path = run_dir()
    _, records = run(tiny_mlp, path, budget, steps=2)
    up = rows(path, "update")
    for s in range(2):
        assert sorted(up[up["step"] == s]["name"]) == sorted(SIZES)
    assert all(u.measured for r in records for u in r.updates.values())


def test_default_budget_is_documented_and_bounded():
    cfg = st.load_config({})
    assert cfg.stats.update_budget_mb == 256.0
    with pytest.raises(Exception, match="update_budget_mb"):
        st.load_config({"stats": {"update_budget_mb": -1}})


def test_a_skipped_optimizer_step_does_not_use_up_a_turn(run_dir, tiny_mlp):
    """No optimizer step in a sampled step (accumulation): nothing measured, the turn stays."""
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    path = run_dir()
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config(stats={"update_budget_mb": 0.0}))
    for step in range(3):
        x, y = batch(step)
        with mon.step(step):
            (tiny_mlp(x) - y).pow(2).mean().backward()
            if step != 1:
                opt.step()
            opt.zero_grad()
    mon.close()
    up = rows(path, "update")
    assert [list(up[up["step"] == s]["name"]) for s in range(3)] == [["0.weight"], [], ["0.bias"]]


def unmeasured(step: int, weight_norm: float = 2.0, name: str = "fc.weight") -> StepRecord:
    return StepRecord(step, True, updates={name: UpdateRecord(name, math.nan, weight_norm, math.nan, measured=False)})


def test_rule_neither_judges_nor_releases_an_unmeasured_parameter():
    rule, events = make(updates.UpdateRatio, ADAM, smoothing=3)
    feed(rule, upd_step(0, 2.5))
    only_open(events, "update.ratio")
    feed(rule, unmeasured(1), unmeasured(2), unmeasured(3))
    assert len(events) == 1  # still open, no update, no close
    assert rule.recent.values("fc.weight") == [2.5]  # the window holds only measured ratios
    feed(rule, upd_step(4, 1e-3), upd_step(5, 1e-3))
    assert [(e["event"], e["step"]) for e in events[1:]] == [("close", 5)]


def test_zero_initialised_detection_uses_the_weight_norm_of_an_unmeasured_step():
    rule, events = make(updates.UpdateRatio, ADAM, smoothing=1)
    feed(rule, unmeasured(0, weight_norm=0.0), upd_step(1, 50.0, weight_norm=0.01))
    assert events == []  # it started at zero: Adam's fixed step against a tiny norm is normal


def test_a_resumed_run_goes_on_where_the_round_robin_stood(run_dir, tiny_mlp):
    """Budget 0: one parameter per sampled step. Two steps measure 0.weight, 0.bias; after resume=True the
    next one is 2.weight, not 0.weight again (state.json carries the position)."""
    path = run_dir()
    opt = torch.optim.Adam(tiny_mlp.parameters(), lr=1e-2)
    cfg = quiet_config(stats={"update_budget_mb": 0.0})
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=cfg)
    train(mon, tiny_mlp, opt, range(2))
    mon.close()
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=cfg, resume=True)
    train(mon, tiny_mlp, opt, range(2, 3))
    mon.close()
    up = rows(path, "update")
    assert [list(up[up["step"] == s]["name"]) for s in range(3)] == [["0.weight"], ["0.bias"], ["2.weight"]]
