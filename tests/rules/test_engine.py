"""The rules engine: thresholds and their resolver, the registry, custom rules, state round trips."""

from __future__ import annotations

import gc
import json
import math
import weakref
from typing import ClassVar

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.errors import ConfigError
from stethoscope.rules import (
    BUILTIN_CODES,
    Rule,
    Threshold,
    ThresholdResolver,
    register_rule,
    registered_rules,
    unregister_rule,
)
from tests.rules._helpers import describe, every_step, found, regression_batch, train
from tests.rules.test_grad_rules import ReluMLP


# ---------------------------------------------------------------------- thresholds
def test_threshold_levels_both_directions():
    up = Threshold(0.05, 0.10)
    assert [up.severity(v) for v in (0.01, 0.05, 0.07, 0.10, math.nan)] == [
        None,
        "warning",
        "warning",
        "critical",
        None,
    ]
    down = Threshold(1e-3, 1e-4, higher_is_worse=False)
    assert [down.severity(v) for v in (1.0, 1e-3, 5e-4, 1e-5)] == [None, "warning", "warning", "critical"]
    assert up.healthy(0.03, 0.8) and not up.healthy(0.045, 0.8)  # hysteresis before closing
    assert down.healthy(2e-3, 0.8) and not down.healthy(1.1e-3, 0.8)
    assert Threshold(math.inf, math.inf).severity(1e9) is None  # .inf turns a level off


def test_field_note_patterns_resolve_last_match_wins():
    """The field note's component limits: projections 30 %, attention in_proj 20 %, MLPs 15 %."""
    res = ThresholdResolver(
        [
            {"pattern": "*projection*", "rule": "grad.zero_fraction", "warning": 0.15, "critical": 0.30},
            {
                "pattern": "*self_attn.in_proj_*",
                "rule": "grad.zero_fraction",
                "warning": 0.10,
                "critical": 0.20,
            },
            {"pattern": "mlp_extractor", "rule": "grad.*", "critical": 0.15},  # an ancestor matches too
            {"pattern": "*", "rule": "update.ratio.low", "warning": 1e-5},
        ]
    )
    default = Threshold(0.05, 0.10)
    zf = "grad.zero_fraction"
    assert res.resolve(zf, "encoder.temporal_projection.weight", default) == Threshold(0.15, 0.30)
    assert res.resolve(zf, "layers.0.self_attn.in_proj_bias", default) == Threshold(0.10, 0.20)
    # only critical given: warning inherited from the default
    assert res.resolve(zf, "mlp_extractor.policy_net.0.weight", default) == Threshold(0.05, 0.15)
    assert res.resolve(zf, "head.weight", default) == default
    assert res.resolve("update.ratio.low", None).warning == 1e-5  # registered default, then "*"
    assert res.resolve("update.ratio.low", None).critical == 1e-8


def test_unknown_rule_in_thresholds_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"did you mean 'grad\.zero_fraction'"):
        st.load_config({"thresholds": [{"pattern": "*", "rule": "grad.zero_fracton", "warning": 0.2}]})
    with pytest.raises(ConfigError, match=r"unknown key 'rules\.windw'.*'window'"):
        st.load_config({"rules": {"windw": 5}})
    cfg = st.load_config({"thresholds": [{"pattern": "*", "rule": "attn.*", "warning": 0.2}]})
    assert cfg.thresholds[0].rule == "attn.*"  # other subsystems' documented codes are accepted


def test_pattern_override_changes_a_real_finding(tmp_path):
    """Dead ReLUs in fc1; a user who allows fc1 90 % zeros hears only about fc2."""

    def dead_model():
        torch.manual_seed(0)
        m = ReluMLP()
        with torch.no_grad():
            m.fc1.bias[:40] = -20.0
        return m

    run = train(
        dead_model(),
        tmp_path / "a",
        3,
        config=every_step(
            thresholds=[{"pattern": "fc1", "rule": "grad.zero_fraction", "warning": 0.9, "critical": 0.95}]
        ),
    )
    targets = {f.target for f in found(run, "grad.zero_fraction")}
    assert "fc2.weight" in targets and not any(t.startswith("fc1.") for t in targets), describe(run)
    assert found(run, "grad.zero_fraction", "fc2.weight")[0].threshold == 0.10


def test_open_findings_are_capped_worst_first(tmp_path):
    m = ReluMLP()
    with torch.no_grad():
        m.fc1.bias[:40] = -20.0
    run = train(m, tmp_path / "r", 2, config=every_step(rules={"max_open": 1}))
    zf = found(run, "grad.zero_fraction")
    assert len(zf) == 1 and zf[0].target.startswith("fc1."), describe(run)
    others = zf[0].data["not_opened"]
    assert others["count"] == 2 and "fc2.weight" in others["targets"]


def test_rules_can_be_disabled(tmp_path):
    m = ReluMLP()
    with torch.no_grad():
        m.fc1.bias[:40] = -20.0
    run = train(m, tmp_path / "r", 2, config=every_step(rules={"disabled": ["grad.*", "update.ratio"]}))
    assert found(run, "act.dead_features") and not [f for f in run.findings if f.code.startswith("grad.")]


# ---------------------------------------------------------------------- registry and custom rules
def test_builtins_are_registered_through_the_public_registry():
    assert set(BUILTIN_CODES) >= {
        "grad.zero_fraction",
        "grad.missing",
        "grad.nonfinite",
        "grad.norm_spike",
        "grad.vanishing",
        "grad.dead_trend",
        "act.dead_features",
        "act.saturation",
        "act.input_scale",
        "numerics.nonfinite",
        "update.ratio",
    }
    assert all(issubclass(registered_rules()[c], Rule) for c in BUILTIN_CODES)
    with pytest.raises(ValueError, match="already registered"):
        register_rule(type("Dup", (Rule,), {"code": "grad.missing"}))
    with pytest.raises(ValueError, match="non-empty finding code"):
        register_rule(type("NoCode", (Rule,), {}))


class LossPlateau(Rule):
    """A user's rule: the loss has not improved for N logged steps (runs on every step)."""

    code = "custom.loss_plateau"
    thresholds: ClassVar[dict[str, Threshold]] = {"custom.loss_plateau": Threshold(warning=5, critical=10)}
    summary = "loss stuck"
    sampled_only = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.best = math.inf
        self.since = 0

    def check(self, record):
        loss = record.scalars.get("loss")
        if loss is None:
            return
        if loss < self.best - 1e-6:
            self.best, self.since = loss, 0
        else:
            self.since += 1
        self.judge(
            "",
            self.since,
            record.step,
            message=f"no improvement for {self.since} steps",
            hint="lower the learning rate",
        )

    def state_dict(self):
        return {"best": self.best, "since": self.since}

    def load_state_dict(self, state):
        self.best, self.since = state["best"], state["since"]


def test_custom_rule_registers_and_fires(tmp_path):
    register_rule(LossPlateau)
    try:
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing learns: the loss never improves
        mon = st.Monitor(
            model,
            opt,
            run_dir=tmp_path / "r",
            config={
                "console": {"quiet": True},
                "thresholds": [{"pattern": "*", "rule": "custom.loss_plateau", "critical": 7}],
            },
        )
        for step in range(12):
            with mon.step(step):
                loss = model(torch.ones(2, 4)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
            mon.log(loss=loss.detach())
        mon.close()
        f = found(st.load_run(tmp_path / "r"), "custom.loss_plateau", "")
        assert f and f[0].first_step == 5 and f[0].severity == "critical" and f[0].threshold == 7
    finally:
        unregister_rule("custom.loss_plateau")
    assert "custom.loss_plateau" not in registered_rules()


# ---------------------------------------------------------------------- state and references
def _pathological_run(run_dir, steps, model, opt, resume=False, start=0):
    mon = st.Monitor(model, opt, run_dir=run_dir, config=every_step(), resume=resume)
    for step in range(start, start + steps):
        if step == 6:
            with torch.no_grad():
                model.fc1.bias[:40] = -20.0  # dead units appear mid-run
        x, y = regression_batch(step, 16)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
    states = {r.name: r.state_dict() for r in mon.context.rules}
    mon.close()
    return states


def _events(run_dir):
    return [{k: v for k, v in e.items() if k != "time"} for e in st.load_run(run_dir).events]


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    """Stop after 5 steps and resume in a new monitor: the findings are those of one unbroken run."""
    torch.manual_seed(0)
    m1 = ReluMLP()
    m2 = ReluMLP()
    m2.load_state_dict(m1.state_dict())
    o1, o2 = torch.optim.Adam(m1.parameters(), 1e-2), torch.optim.Adam(m2.parameters(), 1e-2)
    _pathological_run(tmp_path / "whole", 12, m1, o1)
    states = _pathological_run(tmp_path / "split", 5, m2, o2)
    assert set(states) == set(BUILTIN_CODES)
    for name, state in states.items():  # JSON-serialisable, and loads into a fresh rule
        assert json.loads(json.dumps(state, allow_nan=False)) == state, name
    _pathological_run(tmp_path / "split", 7, m2, o2, resume=True, start=5)
    whole, split = _events(tmp_path / "whole"), _events(tmp_path / "split")
    assert whole and split == whole


def test_no_reference_to_the_model_after_close(tmp_path):
    model = ReluMLP()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    mon = st.Monitor(model, opt, run_dir=tmp_path / "r", config=every_step())
    x, y = regression_batch(0, 16)
    with mon.step(0):
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    mon.close()
    ref, oref = weakref.ref(model), weakref.ref(opt)
    del model, opt
    gc.collect()
    assert ref() is None and oref() is None
    assert mon.context.rules  # the rules are still there, holding plain data only


def test_documented_configuration_examples_are_valid():
    """The YAML examples in docs/rules.md and docs/configuration.md load (they name real keys and rules)."""
    import re
    from pathlib import Path

    import yaml

    docs = Path(__file__).resolve().parents[2] / "docs"
    blocks = []
    for page in ("rules.md", "configuration.md", "findings.md"):
        text = (docs / page).read_text(encoding="utf-8")
        blocks += [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "thresholds:" in b]
    assert len(blocks) >= 3
    for block in blocks:
        st.load_config(yaml.safe_load(block))
