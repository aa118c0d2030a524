"""Mixed precision is normal (issue 15, item 4): a GradScaler's skipped steps are not gradient problems.

Real float16 autocast runs on the CPU with ``torch.amp.GradScaler("cpu")``: a start-up burst of skipped
steps while the scale falls, overflows injected now and then (an identity whose backward multiplies the
gradient by Inf, as an overflowing float16 backward does), the documented loop with ``unscale_`` and
``clip_grad_norm_`` (which multiplies every gradient by 0 when the total norm is Inf), and bfloat16 autocast
without a scaler. Each problem beside a healthy twin that must stay silent.
"""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stethoscope as st
from stethoscope.findings import FindingLog
from stethoscope.record import AmpRecord, GradRecord, StepRecord
from stethoscope.rules import amp as amp_rules
from stethoscope.rules import grads
from stethoscope.rules.base import RuleContext, RulesSettings
from stethoscope.rules.model_info import ModelInfo
from stethoscope.stats import Stats
from tests._events import Events
from tests.rules._helpers import alarms, describe, every_step, found, regression_batch


def _fp16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.Linear(4, 4)(torch.randn(2, 4))
        return out.dtype == torch.float16 and torch.amp.GradScaler("cpu").is_enabled()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _fp16_autocast_works(), reason="float16 autocast / GradScaler on CPU")


class Bomb(torch.autograd.Function):
    """Identity forward; the backward writes ``value`` into one entry of the gradient (Inf: one overflow)."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[0, 0] = ctx.value
        return grad, None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)
        self.bomb: float | None = None  # this step's value for one gradient entry behind fc1, or None

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.bomb is not None:
            h = Bomb.apply(h, self.bomb)
        return self.fc3(self.act(self.fc2(h)))


# A scale far above what these gradients allow (as 2^16 is for a real model's): the scaler starts with a burst
# of skipped steps while it halves down.
INIT_SCALE = 2.0**24


def amp_train(run_dir: Path, steps: int, *, dtype=torch.float16, scaler: bool = True, clip: float | None = None,
              bomb=None, before=None, config: dict | None = None, growth_interval: int = 2000):
    """Train ``Net`` under autocast; returns the run and, per step, whether the scaler skipped it."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sc = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=growth_interval) if scaler else None
    mon = st.Monitor(model, opt, run_dir=run_dir, config=config or every_step(), scaler=sc)
    skipped = []
    try:
        for step in range(steps):
            if before is not None:
                before(model, step)
            model.bomb = bomb(step) if bomb is not None else None
            x, y = regression_batch(step, 16)
            with mon.step(step):
                with torch.autocast("cpu", dtype=dtype):
                    out = model(x)
                loss = F.mse_loss(out.float(), y)
                if sc is not None:
                    sc.scale(loss).backward()
                    if clip is not None:
                        sc.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    scale = sc.get_scale()
                    sc.step(opt)
                    sc.update()
                    skipped.append(sc.get_scale() < scale)
                else:
                    loss.backward()
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    opt.step()
                    skipped.append(False)
                opt.zero_grad(set_to_none=True)
            mon.log(loss=loss.item())
    finally:
        mon.close()
    return st.load_run(run_dir), skipped


def periodic(step: int) -> float | None:
    return math.inf if step in (20, 35, 50) else None


# ---------------------------------------------------------------------------------------------- normal
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip"])
def test_start_up_and_periodic_skips_are_silent(tmp_path, clip):
    run, skipped = amp_train(tmp_path / "r", 60, clip=clip, bomb=periodic,
                             config=every_step(rules={"explain_normal": True}))
    startup = next(i for i, s in enumerate(skipped) if not s)
    assert startup >= 3, skipped  # the start-up burst happened
    assert all(skipped[s] for s in (20, 35, 50)), skipped  # and the periodic overflows were skipped
    assert not alarms(run), describe(run)
    notes = [f for f in run.findings if f.code == "amp.skips" and f.severity == "info"]
    assert notes and f"first {startup} optimizer steps" in notes[0].message, describe(run)
    scale = run.scalars()["amp_scale"].dropna()
    assert scale.iloc[0] < INIT_SCALE and scale.min() > 1.0
    if clip is not None:  # the case is exercised: clipping an Inf total norm zeroed the finite gradients
        g = run.metrics_of("grad")
        at = g[(g["step"] == 20) & (g["name"] == "fc3.weight")]
        assert float(at["zero_fraction"].iloc[0]) == 1.0


def test_skip_flags_of_unsampled_steps_arrive_with_the_next_sampled_step_and_cost_no_sync(tmp_path, monkeypatch):
    """Sampled every 10 steps: the scaler's flags of the steps in between ride along, with no host read."""
    pkg = str(Path(st.__file__).parent)
    counts: collections.Counter = collections.Counter()
    on = {"v": False}

    def from_stethoscope() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.startswith(pkg):
                return True
            frame = frame.f_back
        return False

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if on["v"] and from_stethoscope():
                counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))

    def before(model, step):  # count from step 12's start (flushing unsampled step 11) to the end of step 19
        on["v"] = 12 <= step <= 19

    cfg = every_step()
    cfg["sampling"] = {"warmup_steps": 0, "every": 10, "after_anomaly": 0}
    run, _skipped = amp_train(tmp_path / "r", 61, bomb=lambda s: math.inf if s >= 12 else None, before=before,
                             config=cfg)
    assert counts == collections.Counter(), counts
    skips = found(run, "amp.skips", severity="critical")
    assert skips, describe(run)
    # the window counts every step: 10 per sampled step, not one
    opened = next(e for e in run.events if e["code"] == "amp.skips" and e["event"] == "open")
    assert opened["data"]["steps"] >= 20 and opened["step"] % 10 == 0, opened


# ---------------------------------------------------------------------------------------------- problems
def test_a_persistent_nan_loss_is_critical_even_though_the_scaler_skips(tmp_path):
    def poison(model, step):
        if step == 25:
            with torch.no_grad():
                model.fc2.weight[0, 0] = math.nan  # the scaler skips every step from here: it stays

    run, skipped = amp_train(tmp_path / "r", 40, before=poison, bomb=periodic)
    assert all(skipped[25:]), skipped
    crit = found(run, "grad.nonfinite", severity="critical")
    assert crit and min(f.first_step for f in crit) == 25, describe(run)
    words = [crit[0].message, *(crit[0].data or {}).get("messages", {}).values()]  # an aggregate's members too
    assert any("the loss itself is non-finite" in w for w in words), words
    assert not found(run, "grad.zero_fraction"), describe(run)


def test_a_collapsing_scale_is_an_amp_finding_not_a_gradient_one(tmp_path):
    """Overflow at every step from step 20 (loss finite): the scale halves each time and never recovers."""
    run, skipped = amp_train(tmp_path / "r", 60, clip=1.0, bomb=lambda s: math.inf if s >= 20 else None)
    assert all(skipped[20:])
    assert found(run, "amp.skips", "", "critical"), describe(run)
    collapse = found(run, "amp.scale_collapse", "", "critical")
    assert collapse, describe(run)
    assert not found(run, "grad.nonfinite") and not found(run, "grad.zero_fraction"), describe(run)
    assert not found(run, "grad.dead_trend") and not found(run, "update.ratio"), describe(run)


# ---------------------------------------------------------------------------------------------- bfloat16
def test_bfloat16_without_a_scaler_is_silent_when_healthy(tmp_path):
    run, _ = amp_train(tmp_path / "r", 30, dtype=torch.bfloat16, scaler=False, clip=1.0)
    assert not alarms(run), describe(run)


def test_bfloat16_overflow_is_critical_and_its_clipped_zeros_are_not_dead_units(tmp_path):
    """No scaler skips the step: the Inf reaches clip_grad_norm_ (every finite gradient times 0) and Adam."""
    run, _ = amp_train(tmp_path / "r", 20, dtype=torch.bfloat16, scaler=False, clip=1.0,
                       bomb=lambda s: math.inf if s == 10 else None)
    assert found(run, "grad.nonfinite", severity="critical"), describe(run)
    g = run.metrics_of("grad")
    assert float(g[(g["step"] == 10) & (g["name"] == "fc3.weight")]["zero_fraction"].iloc[0]) == 1.0
    for code in ("grad.zero_fraction", "grad.dead_trend", "grad.vanishing", "update.ratio"):
        assert not found(run, code), describe(run)


# ---------------------------------------------------------------------------------------------- the rules alone


def make(cls, info: ModelInfo | None = None, **settings):
    events = Events()
    ctx = RuleContext(findings=FindingLog(events), info=info or ModelInfo(scaler=True),
                      settings=RulesSettings(**settings))
    return cls(ctx), events.rows


def amp_step(step: int, scale: float, history: list[bool], loss: float = 1.0, nonfinite: int = 0) -> StepRecord:
    stats = Stats(100, 0.0, 1.0, -1.0, 1.0, 1.0, 1.0, 0.0, 0.0, nonfinite, math.nan, 0)
    this = history[-1] if history else None
    return StepRecord(step, True, scalars={"loss": loss}, grads={"w": GradRecord("w", stats)},
                      amp=AmpRecord(scale, this, list(history)))


def run_records(cls, records, **settings):
    rule, events = make(cls, **settings)
    for r in records:
        rule.observe(r)
    return rule, events


def test_amp_skips_leaves_the_start_up_burst_out_and_counts_the_window():
    burst = [amp_step(s, 2.0 ** (16 - s - 1), [True]) for s in range(10)]
    calm = [amp_step(s, 64.0, [s % 25 == 0]) for s in range(10, 60)]  # 2 skips in 50 steps: 4 %
    rule, events = run_records(amp_rules.AmpSkips, burst + calm)
    assert events == [] and rule.startup_skips == 10
    storm = [amp_step(s, 64.0 / 2 ** (s - 59), [s % 2 == 0]) for s in range(60, 100)]  # half the steps
    _rule2, events2 = run_records(amp_rules.AmpSkips, burst + calm + storm)
    opens = [e for e in events2 if e["event"] == "open"]
    assert opens and opens[0]["code"] == "amp.skips" and opens[0]["severity"] == "warning", events2
    assert all(e["severity"] != "critical" for e in events2)  # a window that still holds the calm steps
    # a record carrying many unsampled steps counts them all
    _rule3, events3 = run_records(amp_rules.AmpSkips, [amp_step(0, 8.0, [False] + [True] * 29)])
    assert [e["severity"] for e in events3] == ["critical"] and events3[0]["data"]["steps"] == 30


def test_amp_scale_collapse_by_floor_and_by_falling_after_calibration():
    # the start-up burst falls at every sampled step, down to 2^5: not counted
    burst = [amp_step(s, 2.0 ** (16 - s), [True]) for s in range(1, 12)]
    rule, events = run_records(amp_rules.AmpScaleCollapse, [*burst, amp_step(12, 32.0, [False])])
    assert events == [] and rule.calibrated and rule.falling == 0
    # after calibration, 8 falls in a row open a warning while the scale is still far above the floor
    high = [amp_step(s, 2.0 ** (24 - s), [True]) for s in range(1, 5)] + [amp_step(5, 2.0**20, [False])]
    falls = [amp_step(5 + k, 2.0 ** (20 - k), [True]) for k in range(1, 10)]
    rule, events = run_records(amp_rules.AmpScaleCollapse, high + falls[:7])
    assert events == [] and rule.falling == 7
    rule.observe(falls[7])
    e = [x for x in events if x["event"] == "open"]
    assert [(x["severity"], x["value"], x["threshold"], x["step"]) for x in e] == [("warning", 8, 8, 13)], events
    rule, events = run_records(amp_rules.AmpScaleCollapse, [amp_step(0, 2.0**-9, [False])])
    assert [(x["event"], x["severity"]) for x in events] == [("open", "critical")]
    rule.observe(amp_step(1, 4.0, [False]))
    assert events[-1]["event"] == "close"


def test_grad_nonfinite_is_silent_on_a_skipped_step_with_a_finite_loss_only():
    _, events = run_records(grads.GradNonfinite, [amp_step(s, 2.0**12, [True], nonfinite=5) for s in range(6)])
    assert events == []
    _, events = run_records(grads.GradNonfinite, [amp_step(0, 2.0**12, [True], loss=math.nan, nonfinite=5)])
    assert [(e["event"], e["severity"]) for e in events] == [("open", "critical")]
    # not skipped by the scaler, yet non-finite: critical at once
    _rule, events = run_records(grads.GradNonfinite, [amp_step(0, 2.0**12, [False], nonfinite=5)])
    assert [(e["event"], e["severity"]) for e in events] == [("open", "critical")]


@pytest.mark.parametrize("cls", [amp_rules.AmpSkips, amp_rules.AmpScaleCollapse])
def test_amp_rules_resume_exactly(cls):
    records = ([amp_step(s, 2.0 ** (16 - s), [True]) for s in range(1, 6)]
               + [amp_step(s, 2048.0, [False]) for s in range(6, 30)]
               + [amp_step(s, 2048.0 / 2 ** (s - 29), [True]) for s in range(30, 60)])
    cut = 33
    whole, events = make(cls)
    for r in records:
        whole.observe(r)
    first, _ = make(cls)
    for r in records[:cut]:
        first.observe(r)
    second, resumed = make(cls)
    second.ctx.findings.load_state_dict(json.loads(json.dumps(first.ctx.findings.state_dict())))
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for r in records[cut:]:
        second.observe(r)
    after = [e for e in events if e["step"] >= records[cut].step]
    assert after and resumed == after
