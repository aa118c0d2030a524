"""Mixed precision: when the ``GradScaler``'s skipped steps and loss scale stop being normal.

With float16 autocast a ``GradScaler`` multiplies the loss by a scale (2^16 at first) so that small gradients
do not underflow; when a gradient overflows to Inf/NaN it skips the optimizer step and halves the scale, and
after ``growth_interval`` (2000) clean steps in a row it doubles it again. So skipped steps are how it works:
a burst at start-up while the scale falls from 2^16 to what the gradients allow, and one now and then when
the gradient grows. What is not normal:

* ``amp.skips`` — skips that never stop: a large share of the recent optimizer steps did nothing;
* ``amp.scale_collapse`` — the scale fell to a floor (1: the gradients overflow float16 even unscaled, or a
  NaN is born whatever the scale), or kept falling at every sampled step after the start-up burst.

Both read ``StepRecord.amp`` (with a scaler handed to the monitor: ``Monitor(..., scaler=scaler)``), which
holds the scaler's own skip flag for every step, sampled or not, and its scale at each sampled step, read
without a sync (``monitor/gradients.py``). A non-finite loss is ``grad.nonfinite``'s (critical, skipped or
not). With bfloat16 autocast there is no scaler and nothing here applies.
"""

from __future__ import annotations

import math
from typing import ClassVar

from stethoscope.record import StepRecord
from stethoscope.rules import hints as H
from stethoscope.rules.base import Rule, RuleContext, register_rule
from stethoscope.rules.thresholds import Threshold

_RANK = {None: 0, "warning": 1, "critical": 2}




@register_rule
class AmpSkips(Rule):
    """``amp.skips``: the GradScaler skips too many optimizer steps.

    Value: the share of the last ``WINDOW`` (100) scaler steps — every step, sampled or not — that it
    skipped, judged once ``MIN_STEPS`` (20) are counted. The start-up burst (the run's first consecutive
    skipped steps, at most ``STARTUP`` = 32, while the scale falls from its initial value) is calibration and
    not counted. Warning at 10 %, critical at 50 % (half the steps do nothing). A healthy float16 run skips
    about one step per ``growth_interval`` (2000) after its start-up.
    """

    code = "amp.skips"
    order = 3  # with the run-wide rules, before the per-parameter gradient rules
    thresholds: ClassVar[dict[str, Threshold]] = {"amp.skips": Threshold(0.10, 0.50)}
    summary = "share of recent optimizer steps the GradScaler skipped (after its start-up calibration)"
    WINDOW = 100
    MIN_STEPS = 20
    STARTUP = 32

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.window: list[list[int]] = []  # [steps, skipped] stretches, oldest first, covering WINDOW steps
        self.startup = True  # no scaler step has gone through yet
        self.startup_skips = 0

    def check(self, record: StepRecord) -> None:
        amp = record.amp
        if amp is None:
            return
        step = record.step
        stretches = [(amp.folded_steps, amp.folded_skips)] if amp.folded_steps else []
        stretches += [(1, int(flag)) for flag in amp.history]
        for n, k in stretches:
            if self.startup and k == n and self.startup_skips + n <= self.STARTUP:
                self.startup_skips += n  # still calibrating: the scale falls from its initial value
                continue
            if self.startup:
                self.startup = False
                if self.startup_skips:
                    self.note("", step, self.startup_skips, lambda s=amp.scale: (
                        f"the GradScaler skipped the first {self.startup_skips} optimizer steps while its scale "
                        f"fell to {H.fmt(s)}: the gradients overflowed float16 at the initial scale; it "
                        "calibrates itself this way at the start of every float16 run — normal"))
            self._push(n, k)
        steps = sum(n for n, _ in self.window)
        if steps < self.MIN_STEPS:
            return
        skipped = sum(k for _, k in self.window)
        value = skipped / steps
        self.judge(
            "",
            value,
            step,
            message=lambda: (
                f"the GradScaler skipped {skipped} of the last {steps} optimizer steps ({H.pct(value)}): their "
                f"gradients were non-finite, so those steps did not train; the loss scale is now "
                f"{H.fmt(amp.scale)}"
            ),
            hint=lambda: H.hint(self.code, lr=None),
            data={"skipped": skipped, "steps": steps, "scale": amp.scale},
        )

    def _push(self, n: int, k: int) -> None:
        self.window.append([n, k])
        total = sum(m for m, _ in self.window)
        while len(self.window) > 1 and total - self.window[0][0] >= self.WINDOW:
            total -= self.window.pop(0)[0]

    def state_dict(self) -> dict:
        return {"window": [list(w) for w in self.window], "startup": self.startup,
                "startup_skips": self.startup_skips}

    def load_state_dict(self, state: dict) -> None:
        self.window = [[int(n), int(k)] for n, k in state.get("window", [])]
        self.startup = bool(state.get("startup", True))
        self.startup_skips = int(state.get("startup_skips", 0))


@register_rule
class AmpScaleCollapse(Rule):
    """``amp.scale_collapse``: the GradScaler's loss scale collapsed.

    Two readings, the worse one reported:

    * ``amp.scale_collapse`` — the scale after the step's ``update()``, lower is worse: warning at 1 or
      below, critical at 2^-8 or below. Scaling exists to lift small float16 gradients; a scale under 1 means gradients
      overflow even unscaled, or a NaN/Inf appears whatever the scale: skipping cannot fix it.
    * ``amp.scale_collapse.falling`` — sampled steps in a row at which the scale was lower than at the
      previous sampled step, counted only once a scaler step has gone through (the start-up burst is
      calibration): warning at 8, critical at 16 (a scale that halves this often never recovers: it grows
      back only once per ``growth_interval`` clean steps).
    """

    code = "amp.scale_collapse"
    order = 3
    thresholds: ClassVar[dict[str, Threshold]] = {
        "amp.scale_collapse": Threshold(1.0, 2.0**-8, higher_is_worse=False),
        "amp.scale_collapse.falling": Threshold(8, 16),
    }
    summary = "GradScaler loss scale below a floor, or falling at every sampled step"

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.prev: float | None = None
        self.falling = 0
        self.calibrated = False  # a scaler step has gone through (the start-up burst is over)

    def check(self, record: StepRecord) -> None:
        amp = record.amp
        if amp is None or not math.isfinite(amp.scale):
            return
        step, scale = record.step, amp.scale
        fell = self.prev is not None and scale < self.prev
        if fell and self.calibrated:
            self.falling += 1
        elif not fell:
            self.falling = 0
        self.prev = scale
        if any(not f for f in amp.history) or amp.folded_skips < amp.folded_steps:
            self.calibrated = True
        floor = self.threshold("", "amp.scale_collapse")
        fall = self.threshold("", "amp.scale_collapse.falling")
        by_floor, by_fall = floor.severity(scale), fall.severity(self.falling)
        falling = self.falling
        if by_floor is not None and _RANK[by_floor] >= _RANK[by_fall]:
            self.judge(
                "",
                scale,
                step,
                key="amp.scale_collapse",
                message=lambda: (
                    f"the GradScaler's loss scale is down to {H.fmt(scale)}: the gradients overflow float16 "
                    "even without scaling, or a NaN/Inf is born whatever the scale, and every such step is "
                    "skipped"
                ),
                hint=lambda: H.hint(self.code, lr=None),
                data={"scale": scale, "falling": falling},
            )
        elif by_fall is not None:
            self.judge(
                "",
                falling,
                step,
                key="amp.scale_collapse.falling",
                message=lambda: (
                    f"the GradScaler's loss scale fell at each of the last {falling} sampled steps (now "
                    f"{H.fmt(scale)}): it halves at every skipped step and grows back only after "
                    "growth_interval clean steps, so it is collapsing"
                ),
                hint=lambda: H.hint(self.code, lr=None),
                data={"scale": scale, "falling": falling},
            )
        elif floor.healthy(scale, self.clear_factor) and fall.healthy(falling, self.clear_factor):
            self.release("", step, scale)

    def state_dict(self) -> dict:
        return {"prev": self.prev, "falling": self.falling, "calibrated": self.calibrated}

    def load_state_dict(self, state: dict) -> None:
        self.prev = state.get("prev")
        self.falling = int(state.get("falling", 0))
        self.calibrated = bool(state.get("calibrated", False))
