"""Every built-in rule driven directly on hand-built step records: no model, no monitor, no training loop.

Each rule gets a record sequence that must open its finding (code, target, severity, value, threshold), a
healthy twin that must stay silent, and several get the close after recovery (with the hysteresis margin)
and a ``state_dict`` round trip that must decide exactly as an unbroken run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from stethoscope.collector import merge_stats
from stethoscope.findings import FindingLog
from stethoscope.record import ActRecord, GradRecord, StepRecord, UpdateRecord
from stethoscope.rules import acts, grads, numerics, updates
from stethoscope.rules.base import Rule, RuleContext, RulesSettings
from stethoscope.rules.model_info import ModelInfo, ParamInfo
from stethoscope.stats import Stats, tensor_stats
from tests._events import Events

EPS = 1e-8


# ---------------------------------------------------------------------------------------------- helpers


def make(cls: type[Rule], info: ModelInfo | None = None, **settings) -> tuple[Rule, list[dict]]:
    """A rule on its own context (an in-memory finding log), and the list its events go to."""
    events = Events()
    ctx = RuleContext(findings=FindingLog(events), info=info or ModelInfo(), settings=RulesSettings(**settings))
    return cls(ctx), events.rows


def feed(rule: Rule, *records: StepRecord) -> None:
    for record in records:
        rule.observe(record)


def stats(t: torch.Tensor, features: bool = False) -> Stats:
    """The published statistics of ``t``, through the same engine and host merge the monitor uses."""
    row = tensor_stats(t, EPS, 3.0, features=features)
    return merge_stats([(row.numpy(), t.numel())], t.shape[-1] if features else 0, None)


def with_zeros(n: int, zeros: int) -> torch.Tensor:
    """``n`` entries, the first ``zeros`` of them exactly 0, the rest in [0.5, 1.5] (no randomness)."""
    return torch.cat([torch.zeros(zeros), torch.linspace(0.5, 1.5, n - zeros)])


def gstats(norm: float, count: int = 100, zero_fraction: float = 0.0, nonfinite: int = 0) -> Stats:
    """Gradient statistics given directly: only count, norm, zero and non-finite counts matter to the rules."""
    return Stats(count, 0.0, 1.0, -1.0, 1.0, 1.0, norm, zero_fraction, 0.0, nonfinite, math.nan, 0)


def grad_step(step: int, norms: dict[str, float], **kw) -> StepRecord:
    return StepRecord(step, True, grads={n: GradRecord(n, gstats(v)) for n, v in norms.items()}, **kw)


def opened(events: list[dict], code: str | None = None) -> list[dict]:
    return [e for e in events if e["event"] == "open" and (code is None or e["code"] == code)]


def only_open(events: list[dict], code: str) -> dict:
    """The one event of the sequence, which must be an open of ``code``."""
    assert [(e["event"], e["code"]) for e in events] == [("open", code)], events
    return events[0]


def param(name: str, numel: int = 100, ndim: int = 2, group: int | None = 0, **kw) -> ParamInfo:
    owner = name.rpartition(".")[0]
    return ParamInfo(name, owner, name.rpartition(".")[2], numel, ndim, group=group, **kw)


# ---------------------------------------------------------------------------------------------- numerics.nonfinite
def nan_step(step: int, loss: float = math.nan, grad_nan: int = 4, bad: float = 6.0) -> StepRecord:
    """``act`` is the first call whose output goes non-finite from finite inputs; ``fc2`` only inherits it."""
    return StepRecord(
        step, True, scalars={"loss": loss},
        grads={"fc1.weight": GradRecord("fc1.weight", gstats(1.0, nonfinite=grad_nan))},
        act_calls=[("fc1", "", 0, 0.0, True), ("act", "", 0, bad, True), ("fc2", "", 0, bad, False)],
    )


def clean_step(step: int) -> StepRecord:
    return StepRecord(
        step, True, scalars={"loss": 1.0},
        grads={"fc1.weight": GradRecord("fc1.weight", gstats(1.0))},
        act_calls=[("fc1", "", 0, 0.0, True), ("act", "", 0, 0.0, True), ("fc2", "", 0, 0.0, True)],
    )


def test_numerics_nonfinite_blames_the_origin_not_the_modules_downstream():
    rule, events = make(numerics.NumericsNonfinite)
    feed(rule, clean_step(0), nan_step(1))
    e = only_open(events, "numerics.nonfinite")
    assert (e["target"], e["severity"], e["value"], e["threshold"], e["step"]) == ("act", "critical", 6.0, 1, 1)
    assert "`act` produced 6 NaN/Inf values while its inputs were finite" in e["message"]
    assert "(since step 1)" in e["message"]
    assert rule.ctx.shared["nonfinite_origin"] == "act"
    assert rule.ctx.shared["cause"]["code"] == "numerics.nonfinite"
    # recovery closes it at the first sampled step without a non-finite output, and withdraws the cause
    feed(rule, clean_step(2))
    assert [(e["event"], e["step"], e["value"]) for e in events[1:]] == [("close", 2, 0)]
    assert "cause" not in rule.ctx.shared and not rule.ctx.findings.open


def test_numerics_nonfinite_is_a_warning_when_loss_and_gradients_stayed_finite():
    rule, events = make(numerics.NumericsNonfinite)
    feed(rule, nan_step(0, loss=0.5, grad_nan=0))  # a -inf mask in an intermediate output
    e = only_open(events, "numerics.nonfinite")
    assert (e["severity"], e["threshold"]) == ("warning", 1)
    assert "may be an intentional -inf (a mask)" in e["message"]


def test_numerics_nonfinite_silent_on_finite_steps_and_born_outside_for_a_bad_loss():
    rule, events = make(numerics.NumericsNonfinite)
    feed(rule, *(clean_step(s) for s in range(4)))
    # a NaN in the batch: every output is non-finite, but none was born in a watched module
    feed(rule, StepRecord(4, True, scalars={"loss": math.nan},
                          act_calls=[("fc1", "", 0, 5.0, False), ("act", "", 0, 5.0, False)]))
    assert events == [] and rule.episode is None
    bad_loss = clean_step(5)
    bad_loss.scalars["loss"] = math.inf
    feed(rule, bad_loss)
    e = only_open(events, "numerics.nonfinite")
    assert e["target"] is None and e["severity"] == "critical"
    assert "born outside the model" in e["message"]


# ---------------------------------------------------------------------------------------------- grad.nonfinite
def test_grad_nonfinite_opens_per_parameter_and_closes_on_a_clean_step():
    rule, events = make(grads.GradNonfinite)
    rec = StepRecord(0, True, scalars={"loss": 2.0}, grads={
        "a.weight": GradRecord("a.weight", stats(torch.tensor([1.0, math.nan, 2.0, math.inf, -math.inf, 0.5]))),
        "b.weight": GradRecord("b.weight", stats(torch.ones(6))),
    })
    feed(rule, rec)
    e = only_open(events, "grad.nonfinite")
    assert (e["target"], e["severity"], e["value"], e["threshold"]) == ("a.weight", "critical", 3, 1)
    assert e["message"].startswith("3 of 6 gradient entries of `a.weight` are NaN or Inf; 1 of 2 parameters")
    assert "the loss was finite (2)" in e["message"]
    assert "born in backward" in e["hint"]
    assert e["data"] == {"parameters_nonfinite": 1, "parameters": 2}
    feed(rule, grad_step(1, {"a.weight": 1.0, "b.weight": 1.0}))
    assert [(e["event"], e["target"], e["step"]) for e in events[1:]] == [("close", "a.weight", 1)]


def test_grad_nonfinite_silent_when_finite_and_patient_with_a_grad_scaler():
    rule, events = make(grads.GradNonfinite)
    feed(rule, *(grad_step(s, {"a.weight": 1.0, "b.weight": 2.0}) for s in range(3)))
    assert events == []
    rule, events = make(grads.GradNonfinite, ModelInfo(scaler=True))
    skipped = [StepRecord(s, True, grads={"a.weight": GradRecord("a.weight", gstats(1.0, nonfinite=5))})
               for s in range(3)]
    feed(rule, *skipped[:2])
    assert events == []  # the scaler calibrating its scale: two skipped steps are normal
    feed(rule, skipped[2])
    e = only_open(events, "grad.nonfinite")
    assert e["step"] == 2 and "skipped 3 sampled steps in a row" in e["message"]


# ---------------------------------------------------------------------------------------------- grad.norm_spike
BASE = {"a.weight": 1.0, "b.weight": 1.0}  # total norm sqrt(2)


def test_grad_norm_spike_needs_confirmation_below_critical_then_closes():
    rule, events = make(grads.GradNormSpike)
    feed(rule, *(grad_step(s, BASE) for s in range(5)))
    spike = {"a.weight": 50.0, "b.weight": 1.0}
    feed(rule, grad_step(5, spike))
    assert events == []  # one spiking batch: wait for the next sampled step
    assert rule.ctx.shared["cause"] == {"code": "grad.norm_spike", "target": "", "step": 5,
                                       "what": "a gradient-norm spike"}
    feed(rule, grad_step(6, spike))
    e = only_open(events, "grad.norm_spike")
    ratio = math.sqrt(50.0**2 + 1.0) / math.sqrt(2.0)
    assert e["target"] == "" and e["severity"] == "warning" and e["threshold"] == 10.0
    assert e["value"] == pytest.approx(ratio, rel=1e-12)
    assert e["data"]["culprit"] == "a.weight" and e["data"]["culprit_ratio"] == pytest.approx(50.0)
    assert "the largest jump is in `a.weight` (50× its own median)" in e["message"]
    # back to normal: the ratio is far under 0.8 x 10, so it closes
    feed(rule, grad_step(7, BASE))
    assert [(e["event"], e["step"]) for e in events[1:]] == [("close", 7)]
    assert events[1]["value"] == pytest.approx(1.0)
    assert "cause" not in rule.ctx.shared


def test_grad_norm_spike_critical_at_once_and_silent_on_a_wobble():
    rule, events = make(grads.GradNormSpike)
    feed(rule, *(grad_step(s, BASE) for s in range(3)), grad_step(3, {"a.weight": 200.0, "b.weight": 1.0}))
    e = only_open(events, "grad.norm_spike")
    assert (e["severity"], e["threshold"], e["step"]) == ("critical", 100.0, 3)
    rule, events = make(grads.GradNormSpike)
    feed(rule, *(grad_step(s, {"a.weight": 1.0 + 0.5 * (s % 3), "b.weight": 1.0}) for s in range(12)))
    feed(rule, grad_step(12, {"a.weight": 9.0, "b.weight": 1.0}))  # ~5x: under the 10x level
    assert events == []


# ---------------------------------------------------------------------------------------------- grad.zero_fraction
def zf_step(step: int, zeros: dict[str, int], n: int = 100) -> StepRecord:
    return StepRecord(step, True, grads={p: GradRecord(p, stats(with_zeros(n, z))) for p, z in zeros.items()})


def test_grad_zero_fraction_opens_on_dead_units_and_closes_with_hysteresis():
    rule, events = make(grads.GradZeroFraction, smoothing=1)
    feed(rule, zf_step(0, {"fc.weight": 200, "ok.weight": 10}, n=1000))  # 20 % and 1 %
    e = only_open(events, "grad.zero_fraction")
    assert (e["target"], e["severity"], e["threshold"], e["step"]) == ("fc.weight", "critical", 0.10, 0)
    assert e["value"] == pytest.approx(0.20)
    assert e["message"].startswith(
        "20.0 % of the gradient entries of `fc.weight` are exactly zero, averaged over the last 1 "
        "sampled step: units that pass no gradient"
    )
    feed(rule, zf_step(1, {"fc.weight": 45}, n=1000))  # 4.5 % < 5 %, but not clear of it by the 0.8 margin
    assert len(events) == 1 and rule.is_open("fc.weight")
    feed(rule, zf_step(2, {"fc.weight": 39}, n=1000))  # 3.9 % < 0.8 x 5 %: clear
    assert [(e["event"], e["step"]) for e in events] == [("open", 0), ("close", 2)]
    assert events[1]["value"] == pytest.approx(0.039)


def test_grad_zero_fraction_averages_over_the_smoothing_window():
    rule, events = make(grads.GradZeroFraction)  # smoothing 3
    feed(rule, zf_step(0, {"fc.weight": 6}))
    e = only_open(events, "grad.zero_fraction")
    assert (e["severity"], e["threshold"]) == ("warning", 0.05) and e["value"] == pytest.approx(0.06)
    feed(rule, zf_step(1, {"fc.weight": 0}))  # mean (6 + 0) / 2 = 3 %: under 4 %, closes
    assert [e["event"] for e in events] == ["open", "close"]
    assert events[1]["value"] == pytest.approx(0.03)


def test_grad_zero_fraction_silent_when_healthy_and_for_normal_zeros():
    info = ModelInfo(params={
        "emb.weight": param("emb.weight", embedding=True),
        "attn.k_proj.bias": param("attn.k_proj.bias", ndim=1, key_bias_share=1.0),
        "attn.in_proj_bias": param("attn.in_proj_bias", ndim=1, key_bias_share=1 / 3),
    })
    rule, events = make(grads.GradZeroFraction, info)
    feed(rule, *(zf_step(s, {"fc.weight": 2, "emb.weight": 60, "attn.k_proj.bias": 99,
                             "attn.in_proj_bias": 34}, n=99) for s in range(4)))
    assert events == []
    # the key third of a fused bias is taken out: 44 zeros of 99 are its 33 key entries and 11 of the other 66
    feed(rule, zf_step(4, {"attn.in_proj_bias": 44}, n=99))
    e = only_open(events, "grad.zero_fraction")
    assert (e["target"], e["severity"]) == ("attn.in_proj_bias", "warning")
    # the recent average: an excess of 1/66 twice, then 11/66 (the key third is not counted as dead)
    excess = [(34 / 99 - 1 / 3) / (2 / 3)] * 2 + [(44 / 99 - 1 / 3) / (2 / 3)]
    assert e["value"] == pytest.approx(sum(excess) / 3, rel=1e-6)


# ---------------------------------------------------------------------------------------------- grad.missing
def missing_step(step: int, missing: bool) -> StepRecord:
    names = ["a.weight"] if missing else ["a.weight", "b.weight"]
    return StepRecord(
        step, True,
        grads={n: GradRecord(n, gstats(1.0)) for n in names},
        missing_grads=["b.weight"] if missing else [],
        act_calls=[("a", "", 0, 0.0, True), ("b", "", 0, 0.0, True)],
    )


def test_grad_missing_counts_a_streak_and_closes_when_the_gradient_comes_back():
    info = ModelInfo(params={"a.weight": param("a.weight"), "b.weight": param("b.weight")})
    rule, events = make(grads.GradMissing, info)
    feed(rule, *(missing_step(s, True) for s in range(3)))
    assert [(e["event"], e["severity"], e["value"], e["threshold"], e["step"]) for e in events] == [
        ("open", "warning", 1, 1, 0),
        ("update", "warning", 2, 1, 1),  # worse, not yet critical
        ("update", "critical", 3, 3, 2),  # the third in a row
    ]
    assert all(e["target"] == "b.weight" for e in events)
    assert "in 3 sampled steps in a row" in events[2]["message"]
    assert "its module `b` ran in forward" in events[2]["message"]
    assert "and leave it out of the optimizer" in events[2]["hint"]
    # no backward (evaluation): every parameter is without a gradient, and none is missing
    feed(rule, StepRecord(3, True, missing_grads=["a.weight", "b.weight"]))
    assert len(events) == 3 and rule.streak == {"b.weight": 3}
    feed(rule, missing_step(4, False))
    assert [(e["event"], e["step"], e["value"]) for e in events[3:]] == [("close", 4, 0)]


def test_grad_missing_silent_when_every_parameter_gets_a_gradient():
    rule, events = make(grads.GradMissing)
    feed(rule, *(missing_step(s, False) for s in range(4)))
    assert events == [] and rule.streak == {}


# ---------------------------------------------------------------------------------------------- grad.vanishing
def rms_step(step: int, rms: dict[str, float]) -> StepRecord:
    return grad_step(step, {n: r * 10.0 for n, r in rms.items()})  # 100 entries: norm = rms x 10


PEERS = {"h.0.fc.weight": 1.0, "h.1.fc.weight": 1.0, "h.2.fc.weight": 1.0, "head.weight": 1.0}


def test_grad_vanishing_compares_with_peers_and_keeps_open_inside_the_margin():
    rule, events = make(grads.GradVanishing, smoothing=1)
    feed(rule, rms_step(0, PEERS | {"h.2.fc.weight": 1e-4}))
    e = only_open(events, "grad.vanishing")
    assert (e["target"], e["severity"], e["threshold"]) == ("h.2.fc.weight", "critical", 1e-3)
    assert e["value"] == pytest.approx(1e-4)
    assert "the median of its 3 peers `h.*.fc.weight`" in e["message"]
    feed(rule, rms_step(1, PEERS | {"h.2.fc.weight": 0.011}))  # above 1e-2 but not above 1e-2 / 0.8
    assert len(events) == 1 and rule.is_open("h.2.fc.weight")
    feed(rule, rms_step(2, PEERS | {"h.2.fc.weight": 0.5}))
    assert [(e["event"], e["step"]) for e in events[1:]] == [("close", 2)]
    assert events[1]["value"] == pytest.approx(0.5)


def test_grad_vanishing_silent_on_comparable_gradients_and_too_few_parameters():
    rule, events = make(grads.GradVanishing)
    feed(rule, *(rms_step(s, PEERS | {"h.2.fc.weight": 0.3, "head.weight": 0.05}) for s in range(4)))
    assert events == []
    rule, events = make(grads.GradVanishing)
    feed(rule, rms_step(0, {"a.weight": 1.0, "b.weight": 1.0, "c.weight": 1e-9}))  # under MIN_PARAMS
    assert events == []


# ---------------------------------------------------------------------------------------------- grad.dead_trend
def trend_step(step: int, zf: float, norm: float = 10.0) -> StepRecord:
    return StepRecord(step, True, grads={"fc.weight": GradRecord("fc.weight", gstats(norm, zero_fraction=zf))})


def test_grad_dead_trend_opens_on_a_steady_rise_under_the_zero_fraction_level():
    rule, events = make(grads.GradDeadTrend)
    feed(rule, *(trend_step(s, 0.01 * s) for s in range(4)))
    assert events == []  # fewer than rules.min_history (5) points
    feed(rule, trend_step(4, 0.04))
    e = only_open(events, "grad.dead_trend")
    assert (e["target"], e["severity"], e["threshold"], e["step"]) == ("fc.weight", "warning", 0.02, 4)
    assert e["value"] == pytest.approx(0.04)  # 1 point per step over 4 steps
    assert e["data"] == {"zero_fraction": pytest.approx(0.03), "tau": 1.0, "points": 5}
    assert "rose by 4.0 points between steps 0 and 4 (now 3.0 %, trend tau 1.00)" in e["message"]
    assert "crosses the critical 10.0 % in about 7 steps" in e["message"]


@pytest.mark.parametrize(
    "zfs, norms",
    [
        ([0.03] * 6, [10.0] * 6),  # flat
        ([0.0, 0.01, 0.02, 0.03, 0.04, 0.05], [10.0, 10.0, 8.0, 4.0, 3.0, 2.0]),  # the whole gradient shrinks
        ([0.0, 0.001, 0.002, 0.003, 0.004, 0.005], [10.0] * 6),  # rising, but under the 1 % floor
        ([0.06, 0.0, 0.04, 0.06, 0.02, 0.08], [10.0] * 6),  # a rising slope, but up and down (tau 0.27)
    ],
    ids=["flat", "shrinking-gradient", "under-floor", "no-trend"],
)
def test_grad_dead_trend_silent_without_a_steady_rise_of_dead_units(zfs, norms):
    rule, events = make(grads.GradDeadTrend)
    feed(rule, *(trend_step(s, zf, n) for s, (zf, n) in enumerate(zip(zfs, norms, strict=True))))
    assert events == []


# ---------------------------------------------------------------------------------------------- act.dead_features
def dead_step(step: int, dead: int, rows: int = 32, width: int = 16) -> StepRecord:
    t = torch.linspace(0.1, 1.0, rows * width).reshape(rows, width)
    t[:, :dead] = 0.0
    st = stats(t, features=True)
    return StepRecord(
        step, True,
        acts={("relu", "", 0): ActRecord("relu", "", 1, st)},
        act_calls=[("fc", "", 0, 0.0, True), ("relu", "", 0, 0.0, True)],
    )


ACT_INFO = ModelInfo(module_types={"fc": "Linear", "relu": "ReLU", "tanh": "Tanh"})


def test_act_dead_features_opens_names_the_feeding_layer_and_closes():
    rule, events = make(acts.ActDeadFeatures, ACT_INFO, smoothing=1)
    feed(rule, dead_step(0, 8))
    e = only_open(events, "act.dead_features")
    assert (e["target"], e["severity"], e["value"], e["threshold"]) == ("relu", "critical", 0.5, 0.25)
    assert e["message"] == (
        "8 of 16 output features of `relu` are zero for every one of the 32 rows this step "
        "(50.0 % averaged over recent sampled steps): dead ReLUs"
    )
    assert "put a LayerNorm in front of `fc`" in e["hint"] and "a leaky activation" in e["hint"]
    feed(rule, dead_step(1, 0))
    assert [(e["event"], e["step"], e["value"]) for e in events[1:]] == [("close", 1, 0.0)]


def test_act_dead_features_silent_when_alive_or_with_too_few_rows():
    rule, events = make(acts.ActDeadFeatures, ACT_INFO)
    feed(rule, *(dead_step(s, 1) for s in range(3)))  # 1 of 16 = 6 %: under 10 %
    feed(rule, dead_step(3, 8, rows=8))  # 8 rows < rules.min_rows: a unit is zero by chance
    assert events == []


# ---------------------------------------------------------------------------------------------- act.saturation
def sat_step(step: int, beyond: int, act: str = "tanh") -> StepRecord:
    t = torch.cat([torch.full((beyond,), 5.0), torch.linspace(-1.0, 1.0, 100 - beyond)]).reshape(10, 10)
    return StepRecord(
        step, True,
        acts={("fc", "", 0): ActRecord("fc", "", 1, stats(t)), (act, "", 0): ActRecord(act, "", 1, stats(t.tanh()))},
        act_calls=[("fc", "", 0, 0.0, True), (act, "", 0, 0.0, True)],
    )


def test_act_saturation_judges_the_projection_feeding_a_saturating_activation():
    rule, events = make(acts.ActSaturation, ACT_INFO, smoothing=1)
    feed(rule, sat_step(0, 40))
    e = only_open(events, "act.saturation")
    assert (e["target"], e["severity"], e["threshold"]) == ("fc", "critical", 0.25)
    assert e["value"] == pytest.approx(0.40)
    assert "40.0 % of the output of `fc` is beyond ±3" in e["message"]
    assert "it feeds `tanh` (tanh), which is nearly flat there" in e["message"]
    assert rule.pairs == {"fc": "tanh"}
    feed(rule, sat_step(1, 9))  # 9 % < 10 % but not < 8 %: hysteresis keeps it open
    assert len(events) == 1
    feed(rule, sat_step(2, 2))
    assert [(e["event"], e["step"]) for e in events[1:]] == [("close", 2)]


def test_act_saturation_silent_when_inside_the_bound_or_before_a_relu():
    rule, events = make(acts.ActSaturation, ACT_INFO)
    feed(rule, *(sat_step(s, 3) for s in range(3)))
    assert events == []
    rule, events = make(acts.ActSaturation, ACT_INFO)
    feed(rule, *(sat_step(s, 60, act="relu") for s in range(3)))  # ReLUs die, they do not saturate
    assert events == [] and rule.pairs == {}


# ---------------------------------------------------------------------------------------------- act.input_scale
def input_step(step: int, outside: int) -> StepRecord:
    t = torch.cat([torch.full((outside,), -8.0), torch.linspace(-2.0, 2.0, 200 - outside)]).reshape(20, 10)
    return StepRecord(step, True, inputs={("fc", "", 0): ActRecord("fc", "", 1, stats(t))},
                      act_calls=[("norm", "", 0, 0.0, True), ("fc", "", 0, 0.0, True)])


def test_act_input_scale_opens_on_unscaled_inputs_and_blames_the_norm_before():
    info = ModelInfo(module_types={"norm": "LayerNorm", "fc": "Linear"})
    rule, events = make(acts.ActInputScale, info)
    feed(rule, input_step(0, 100))
    e = only_open(events, "act.input_scale")
    assert (e["target"], e["severity"], e["value"], e["threshold"]) == ("fc", "critical", 0.5, 0.30)
    assert e["message"].startswith("50.0 % of the features entering `fc` are outside [-3, 3] (recent average)")
    assert "range=[-8, 2]" in e["message"]
    assert e["hint"].startswith("The module that ran just before it, `norm`, is a normalisation layer")


def test_act_input_scale_silent_on_normalised_inputs():
    rule, events = make(acts.ActInputScale)
    feed(rule, *(input_step(s, 0) for s in range(4)))
    assert events == []


# ---------------------------------------------------------------------------------------------- update.ratio
ADAM = ModelInfo(
    params={"fc.weight": param("fc.weight"), "fc.bias": param("fc.bias", ndim=1)},
    optimizer="Adam", adam_like=True, group_hparams=[{"lr": 0.1}],
)


def upd_step(step: int, ratio: float, weight_norm: float = 2.0, name: str = "fc.weight") -> StepRecord:
    return upd_many(step, {name: (ratio, weight_norm)})


def upd_many(step: int, moves: dict[str, tuple[float, float]]) -> StepRecord:
    """name -> (update ratio, weight norm); every parameter got a gradient of norm 1."""
    return StepRecord(
        step, True,
        grads={n: GradRecord(n, gstats(1.0)) for n in moves},
        updates={n: UpdateRecord(n, r * w, w, r) for n, (r, w) in moves.items()},
    )


def test_update_ratio_too_high_quotes_the_learning_rate_then_closes():
    rule, events = make(updates.UpdateRatio, ADAM, smoothing=1)
    feed(rule, upd_step(0, 2.5))
    e = only_open(events, "update.ratio")
    assert (e["target"], e["severity"], e["value"], e["threshold"]) == ("fc.weight", "warning", 2.5, 1.0)
    assert "moves `fc.weight` by 2.5× its own norm" in e["message"]
    assert "Adam moves each weight by about lr = 0.1 per step, which for weights of RMS 0.2" in e["message"]
    # Adam at 0.1: far above its usual range, so the hint gives the range, not "a third of it"
    assert "the learning rate is 0.1, far above the usual range (1e-3 or lower for Adam/AdamW" in e["hint"]
    feed(rule, upd_step(1, 20.0))
    assert [(e["event"], e["severity"], e["threshold"]) for e in events[1:]] == [("update", "critical", 10.0)]
    feed(rule, upd_step(2, 1e-3))
    assert [(e["event"], e["step"], e["value"]) for e in events[2:]] == [("close", 2, 1e-3)]


def test_update_ratio_too_low_and_not_in_the_optimizer():
    rule, events = make(updates.UpdateRatio, ADAM, smoothing=1)
    feed(rule, upd_step(0, 1e-9))
    e = only_open(events, "update.ratio")
    assert (e["severity"], e["value"], e["threshold"]) == ("critical", 1e-9, 1e-8)
    assert "about 1.00e+09 steps to change it by its own size" in e["message"]
    info = ModelInfo(params={"fc.weight": param("fc.weight", group=None)}, optimizer="SGD", group_hparams=[{"lr": 1}])
    rule, events = make(updates.UpdateRatio, info)
    feed(rule, upd_step(0, 0.0))
    e = only_open(events, "update.ratio")
    assert (e["severity"], e["value"], e["threshold"]) == ("critical", 0.0, 1e-8)
    assert e["message"] == "`fc.weight` gets a gradient but is in no optimizer param group: it never moves"


def test_update_ratio_silent_when_healthy_or_zero_initialised():
    rule, events = make(updates.UpdateRatio, ADAM)
    feed(rule, *(upd_step(s, 1e-3) for s in range(4)))
    assert events == []
    rule, events = make(updates.UpdateRatio, ADAM)
    feed(rule, upd_step(0, 0.0, weight_norm=0.0, name="fc.bias"))  # starts at zero: Adam's fixed step is huge
    feed(rule, *(upd_step(s, 5.0, weight_norm=1e-3, name="fc.bias") for s in range(1, 4)))
    assert events == [] and rule.zero_init == {"fc.bias"}


# ---------------------------------------------------------------------------------------------- resume
# (rule, its model info, its settings, the records, where the run is cut): in each case what the rule keeps
# between steps decides what happens after the cut, so a rule resumed without its state decides differently.
RESUME = {
    "grad.missing": (grads.GradMissing, None, {}, [missing_step(s, True) for s in range(3)] + [missing_step(3, False)], 2),
    "grad.zero_fraction": (
        grads.GradZeroFraction, None, {},
        [zf_step(0, {"fc.weight": 9}), zf_step(1, {"fc.weight": 9}), zf_step(2, {"fc.weight": 0}),
         zf_step(3, {"fc.weight": 0}), zf_step(4, {"fc.weight": 0})], 2,
    ),
    "grad.norm_spike": (
        grads.GradNormSpike, None, {},
        [grad_step(s, BASE) for s in range(4)] + [grad_step(s, {"a.weight": 30.0, "b.weight": 1.0}) for s in (4, 5)]
        + [grad_step(6, BASE)], 5,
    ),
    "grad.dead_trend": (grads.GradDeadTrend, None, {}, [trend_step(s, 0.01 * s) for s in range(6)], 3),
    "numerics.nonfinite": (
        numerics.NumericsNonfinite, None, {}, [clean_step(0), nan_step(1), nan_step(2, bad=60.0), clean_step(3)], 2,
    ),
    "update.ratio": (
        updates.UpdateRatio, ADAM, {},
        [upd_many(0, {"fc.bias": (0.0, 0.0), "fc.weight": (3.0, 2.0)}),  # the bias starts at zero
         *(upd_many(s, {"fc.bias": (5.0, 1e-3), "fc.weight": (3.0, 2.0)}) for s in (1, 2)),
         *(upd_many(s, {"fc.bias": (5.0, 1e-3), "fc.weight": (1e-3, 2.0)}) for s in (3, 4))], 3,
    ),
    "act.dead_features": (acts.ActDeadFeatures, ACT_INFO, {}, [dead_step(0, 0), dead_step(1, 0), dead_step(2, 12)], 2),
}


def _run(cls, info, settings, records, cut, state=None):
    """Events after ``cut`` of a rule that saw ``records[:cut]`` (fresh when ``state`` is ``"fresh"``, resumed
    from a JSON round trip of its state and the finding log's when ``state`` is ``"resumed"``)."""
    first, first_events = make(cls, info, **settings)
    feed(first, *records[:cut])
    if state is None:
        before = len(first_events)
        feed(first, *records[cut:])
        return first_events[before:]
    second, events = make(cls, info, **settings)
    second.ctx.findings.load_state_dict(json.loads(json.dumps(first.ctx.findings.state_dict())))
    if state == "resumed":
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    feed(second, *records[cut:])
    return events


@pytest.mark.parametrize("code", sorted(RESUME))
def test_a_resumed_rule_decides_exactly_as_an_unbroken_one(code):
    cls, info, settings, records, cut = RESUME[code]
    unbroken = _run(cls, info, settings, records, cut)
    assert unbroken, "the scenario must produce events after the cut"
    assert _run(cls, info, settings, records, cut, "resumed") == unbroken
    # ...and what the state carries matters: without it the rule decides otherwise
    assert _run(cls, info, settings, records, cut, "fresh") != unbroken
