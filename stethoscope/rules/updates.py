"""``update.ratio``: how far one optimizer step moves each parameter, against its own size.

The monitor measures ‖Δw‖ / ‖w‖ around the optimizer's step (``record.updates``). Adam-family optimizers
move every weight by about ``lr`` per step whatever the gradient's scale, so their ratio sits near
``lr / rms(w)``; that is what a learning rate implies, and what this rule holds the ratio against.
"""

from __future__ import annotations

import math
from typing import ClassVar

from stethoscope.record import StepRecord, UpdateRecord
from stethoscope.rules import hints as H
from stethoscope.rules._series import Series, median
from stethoscope.rules.base import Rule, RuleContext, register_rule
from stethoscope.rules.grads import MIN_RMS_IN_EPS, judged_step, rms
from stethoscope.rules.thresholds import Threshold


@register_rule
class UpdateRatio(Rule):
    """``update.ratio``: update-to-weight ratio far outside what the learning rate should give.

    Value: the median ‖Δw‖/‖w‖ over the last ``rules.smoothing`` sampled steps that measured the parameter
    (``stats.update_budget_mb``: a sampled step may measure only some; the others are not judged then).
    Too high (key ``update.ratio``): warning at 1 (a step rewrites the weight entirely), critical at 10. Too low (key
    ``update.ratio.low``): warning at 1e-6, critical at 1e-8 (a million steps to move a weight by its own
    size); a parameter that gets a gradient but is in no optimizer param group is critical at once.

    Normal and skipped: parameters that started at zero (zero-initialised biases: their ratio is huge for
    a while, Adam's fixed step against a tiny norm); steps that did not move a parameter at all (a learning
    rate of 0 during warm-up); steps the GradScaler skipped and steps with a non-finite gradient (an update
    made of clipping's zeros and NaN is grad.nonfinite's case); embeddings and key-projection biases, whose
    gradients are partly or wholly zero by design, on the low side. The learning rate quoted in messages is
    read from the optimizer when the step is flushed (at the next step boundary), so a scheduler may
    already have moved it by one step.
    """

    code = "update.ratio"
    order = 30
    thresholds: ClassVar[dict[str, Threshold]] = {
        "update.ratio": Threshold(1.0, 10.0),
        "update.ratio.low": Threshold(1e-6, 1e-8, higher_is_worse=False),
    }
    summary = "update-to-weight ratio too high (learning rate too high) or too low"

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.recent = Series(self.settings.smoothing)
        self.zero_init: set[str] = set()
        self.seen: set[str] = set()

    def check(self, record: StepRecord) -> None:
        if not judged_step(record):
            return
        step = record.step
        for name, u in record.updates.items():
            if name not in self.seen:
                self.seen.add(name)
                if u.weight_norm == 0:
                    self.zero_init.add(name)
            if not u.measured:
                continue  # outside this step's update budget: its window keeps its last measured ratios
            if not (math.isfinite(u.weight_norm) and math.isfinite(u.update_norm)) or u.weight_norm == 0:
                continue
            pi = self.info.params.get(name)
            if self.info.optimizer is not None and pi is not None and pi.group is None:
                self._not_in_optimizer(name, record)
                continue
            if u.update_norm == 0:
                continue  # no update at all: lr 0 (warm-up), or a step the GradScaler skipped
            lr = self.ctx.lr(name)
            value = median([v for _, v in self.recent.push(name, step, u.ratio)])
            high = self.threshold(name, "update.ratio")
            low = self.threshold(name, "update.ratio.low")
            if name not in self.zero_init and high.severity(value):
                self.judge(
                    name,
                    value,
                    step,
                    key="update.ratio",
                    message=lambda name=name, v=value, u=u, lr=lr: self._message_high(name, v, u, lr),
                    hint=lambda lr=lr: H.hint(self.code, "high", lr=lr, info=self.info),
                )
            elif self._low_eligible(name, record) and low.severity(value):
                self.judge(
                    name,
                    value,
                    step,
                    key="update.ratio.low",
                    message=lambda name=name, v=value, lr=lr: self._message_low(name, v, lr),
                    hint=lambda: H.hint(self.code, "low"),
                )
            elif high.healthy(value, self.clear_factor) and low.healthy(value, self.clear_factor):
                self.release(name, step, value)

    def _low_eligible(self, name: str, record: StepRecord) -> bool:
        pi = self.info.params.get(name)
        if pi is not None and (pi.embedding or pi.key_bias_share > 0):
            return False
        if name in self.ctx.shared.get("biases_before_norm", ()):
            return False
        g = record.grads.get(name)
        return g is not None and rms(g.stats) >= MIN_RMS_IN_EPS * self.ctx.eps

    def _not_in_optimizer(self, name: str, record: StepRecord) -> None:
        g = record.grads.get(name)
        if g is None or not g.stats.norm > 0:
            return
        self.judge(
            name,
            0.0,
            record.step,
            key="update.ratio.low",
            severity="critical",
            message=f"`{name}` gets a gradient but is in no optimizer param group: it never moves",
            hint=H.hint(self.code, "not_in_optimizer", name=name),
        )

    def _implied(self, name: str, u: UpdateRecord, lr: float | None) -> str:
        pi = self.info.params.get(name)
        if not (self.info.adam_like and lr and pi is not None and pi.numel):
            return ""
        w_rms = u.weight_norm / math.sqrt(pi.numel)
        return (
            f"; {self.info.optimizer} moves each weight by about lr = {H.fmt(lr)} per step, which for weights "
            f"of RMS {H.fmt(w_rms)} implies a ratio near {H.fmt(lr / w_rms)}"
        )

    def _message_high(self, name: str, value: float, u: UpdateRecord, lr: float | None) -> str:
        return (
            f"one optimizer step moves `{name}` by {H.fmt(value)}× its own norm (median of recent sampled "
            f"steps; ‖Δw‖ = {H.fmt(u.update_norm)}, ‖w‖ = {H.fmt(u.weight_norm)}){self._implied(name, u, lr)}: "
            "the learning rate is too high"
        )

    def _message_low(self, name: str, value: float, lr: float | None) -> str:
        steps = 1.0 / value if value > 0 else math.inf
        return (
            f"one optimizer step moves `{name}` by only {H.fmt(value)}× its own norm (median of recent sampled "
            f"steps; lr {H.fmt(lr)}): about {H.fmt(steps)} steps to change it by its own size — the learning "
            "rate is too low"
        )

    def state_dict(self) -> dict:
        return {
            "recent": self.recent.state_dict(),
            "zero_init": sorted(self.zero_init),
            "seen": sorted(self.seen),
        }

    def load_state_dict(self, state: dict) -> None:
        self.recent.load_state_dict(state.get("recent", {}))
        self.zero_init = set(state.get("zero_init", []))
        self.seen = set(state.get("seen", []))
