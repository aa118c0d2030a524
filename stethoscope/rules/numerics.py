"""``numerics.nonfinite``: where a NaN or Inf is born in the forward pass.

The target is the module whose output is non-finite while its inputs were finite, the first such call to
finish (post-hook order: a child before its parent). A non-finite value born in a functional op inside a
module's own ``forward`` is that module's: its children's outputs were finite, its own output is not.
Modules downstream only inherit the value and are never blamed. One finding per episode: it opens at the
first sampled step with a non-finite module output and closes at the first sampled step without one.

"Inputs were finite" means no entry of a floating input was NaN or ±Inf, decided on the device without a
host read (``ForwardObserver.input_flag``): an input that a watched module produced reuses that output's
non-finite count, any other is checked through its extremes. Finite-but-huge inputs count as finite: a
residual stream at 1e37 whose float32 *sum* overflows still lets the LayerNorm that turns it into inf be
named, rather than the parent that holds both.
"""

from __future__ import annotations

import math
from typing import ClassVar

from stethoscope.record import StepRecord
from stethoscope.rules import hints as H
from stethoscope.rules.base import Rule, RuleContext, register_rule
from stethoscope.rules.thresholds import Threshold


@register_rule
class NumericsNonfinite(Rule):
    """See the module docstring. Value: non-finite entries in the origin's output. Critical from one.

    It is lowered to a warning when the step's loss was logged and finite and every gradient finite: a
    ``-inf`` in an intermediate output that is masked away later (attention scores) can be intentional.
    """

    code = "numerics.nonfinite"
    order = 0
    thresholds: ClassVar[dict[str, Threshold]] = {"numerics.nonfinite": Threshold(1, 1)}
    summary = "the module whose forward output first went NaN/Inf while its inputs were finite"

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.episode: str | None = None  # target of the open finding ("" is the model's own forward)
        self.open_step: int | None = None
        self.first_bad_loss: int | None = None  # first step (sampled or not) with a non-finite loss

    def observe(self, record: StepRecord) -> None:
        loss = record.scalars.get("loss")
        if loss is not None and not math.isfinite(loss) and self.first_bad_loss is None:
            self.first_bad_loss = record.step
        super().observe(record)

    def check(self, record: StepRecord) -> None:
        self.ctx.shared.pop("nonfinite_origin", None)
        calls = record.act_calls
        if not calls:
            return
        step = record.step
        any_bad = any(nf > 0 for _, _, _, nf, _ in calls)
        loss = record.scalars.get("loss")
        if not any_bad:
            if loss is not None and not math.isfinite(loss):
                self._outside(record, loss)
                return
            if self.episode is not None:
                self.release(self.episode, step, 0)
                self.episode = None
                if self.ctx.shared.get("cause", {}).get("code") == self.code:
                    self.ctx.shared.pop("cause")
            if self.is_open(None):
                self.release(None, step, 0)
            return
        origin = None
        for name, output, call, nf, inputs_finite in calls:
            if nf > 0 and inputs_finite and self.threshold(name).severity(nf) is not None:
                origin = (name, output, call, nf)
                break
        if self.episode is None:
            if origin is None:
                return  # every non-finite output had non-finite inputs: born before the watched modules
            self.episode = origin[0]
            self.open_step = step
            self._announce()
        target = self.episode
        self.ctx.shared["nonfinite_origin"] = target if target else "<model>"
        nf = origin[3] if origin is not None and origin[0] == target else max(c[3] for c in calls)
        grads_finite = bool(record.grads) and all(r.stats.nonfinite == 0 for r in record.grads.values())
        benign = loss is not None and math.isfinite(loss) and grads_finite
        corrupted = self._weights_nonfinite(target, record)
        self.judge(
            target,
            nf,
            step,
            severity="warning" if benign else None,
            message=lambda: self._message(target, origin, nf, corrupted, benign),
            hint=lambda: self._hint(target, corrupted),
            data={
                "output": origin[1] if origin else None,
                "call": origin[2] if origin else None,
                "first_nonfinite_loss_step": self.first_bad_loss,
            },
        )

    def _announce(self) -> None:
        """Tell the other rules a NaN episode is open: what opens now is likely its consequence."""
        what = f"a NaN/Inf born in `{self.episode or '<model>'}`"
        self.ctx.shared["cause"] = {"code": self.code, "target": self.episode, "step": self.open_step, "what": what}

    def _weights_nonfinite(self, module: str, record: StepRecord) -> bool:
        for p in self.info.params_of(module):
            u = record.updates.get(p)
            if u is not None and not math.isfinite(u.weight_norm):
                return True
        return False

    def _outside(self, record: StepRecord, loss: float) -> None:
        self.judge(
            None,
            1,
            record.step,
            message=(
                f"the loss is {H.fmt(loss)} while every module output was finite: the non-finite "
                "value is born outside the model (the loss function or the training loop)"
            ),
            hint=H.hint(self.code, "outside"),
        )

    def _message(self, target: str, origin, nf: float, corrupted: bool, benign: bool) -> str:
        who = f"`{target}`" if target else "the model's own forward (the root module)"
        out = f" (output `{origin[1]}`)" if origin and origin[1] else ""
        text = (
            f"{who}{out} produced {int(nf)} NaN/Inf values while its inputs were finite: the first module "
            f"to go non-finite (since step {self.open_step}); modules after it only inherit the value"
        )
        if corrupted:
            text += (
                "; its own weights are already non-finite, so an earlier step's update wrote NaN into them"
                + (
                    f" (the loss first went non-finite at step {self.first_bad_loss})"
                    if self.first_bad_loss is not None
                    else ""
                )
            )
        if benign:
            text += "; the loss and gradients stayed finite, so this may be an intentional -inf (a mask)"
        return text

    def _hint(self, target: str, corrupted: bool) -> str:
        if corrupted:
            return H.hint(self.code, "corrupted", lr=None)
        who = f"`{target}`'s forward" if target else "the model's forward"
        return H.hint(self.code, who=who, lr=None)

    def state_dict(self) -> dict:
        return {"episode": self.episode, "open_step": self.open_step, "first_bad_loss": self.first_bad_loss}

    def load_state_dict(self, state: dict) -> None:
        self.episode = state.get("episode")
        self.open_step = state.get("open_step")
        self.first_bad_loss = state.get("first_bad_loss")
        if self.episode is not None:
            self._announce()
