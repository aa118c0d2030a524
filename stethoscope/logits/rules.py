"""``logits.divergence``: the LM head's logit level (mean logit, log Z) drifting from where the run started.

Softmax is shift-invariant, so nothing in the cross-entropy holds the *level* of the logits: with Adam and a
high learning rate it runs away (Wortsman et al. 2023, "output logit divergence"; PaLM's z-loss keeps
log Z = logsumexp(logits) near 0 for that reason). The rule judges the larger of ``|Δ mean logit|`` and
``|Δ log Z|`` against the run's first sampled step (a pretrained head that already sits at -80 is judged on
how far it moves, not where it starts), averaged over the last ``rules.smoothing`` sampled steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

from stethoscope.rules import hints as H
from stethoscope.rules.base import Rule
from stethoscope.rules.thresholds import Threshold, register_threshold

# the z-loss coefficient the literature uses (PaLM, Chowdhery et al. 2022; Wortsman et al. 2023; OLMo 2)
Z_LOSS_COEF = 1e-4  # shown as "1e-4" in the hint


@dataclass
class HeadLogits:
    """One LM head's logits at a sampled step, summarised over the rows looked at."""

    name: str
    rows: int
    mean_logit: float  # mean over rows and vocabulary
    log_z: float  # mean over rows of logsumexp over the vocabulary
    log_z_max: float
    log_z_min: float
    logit_max: float
    logit_min: float
    vocab: int


class LogitDivergence(Rule):
    code = "logits.divergence"
    summary = "the LM head's logit level (mean logit or log Z) drifted far from where the run started"
    thresholds: ClassVar[dict[str, Threshold]] = {"logits.divergence": Threshold(20.0, 50.0)}
    order: ClassVar[int] = 45

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.start: dict[str, tuple[float, float]] = {}  # head -> (mean logit, log Z) at its first sampled step
        self.recent: dict[str, deque] = {}

    def check(self, record: Any) -> None:  # driven through check_heads by the logits extension
        return None

    def check_heads(self, step: int | None, heads: list[HeadLogits]) -> None:
        for h in heads:
            self.check_head(step, h)
        self.settle(step)

    def check_head(self, step: int | None, h: HeadLogits) -> None:
        if h.rows <= 0:
            return
        mu0, z0 = self.start.setdefault(h.name, (h.mean_logit, h.log_z))
        window = self.recent.setdefault(h.name, deque(maxlen=max(1, self.settings.smoothing)))
        window.append((h.mean_logit - mu0, h.log_z - z0))
        d_mu = sum(d for d, _ in window) / len(window)
        d_z = sum(d for _, d in window) / len(window)
        value = max(abs(d_mu), abs(d_z))
        which = "log Z" if abs(d_z) >= abs(d_mu) else "the mean logit"
        self.judge(
            h.name, value, step,
            message=lambda: (
                f"output logits of {h.name} are drifting: {which} moved {max(d_mu, d_z, key=abs):+.1f} nats from "
                f"the run's start (mean logit {mu0:.2f} -> {h.mean_logit:.2f}, log Z {z0:.2f} -> {h.log_z:.2f}, "
                f"max logit {h.logit_max:.1f}; vocabulary {h.vocab})"
            ),
            hint=lambda: H.hint(self.code, z_loss="1e-4", z_penalty=H.fmt(Z_LOSS_COEF * h.log_z ** 2),
                                log_z=H.fmt(h.log_z), lr=self._head_lr(h.name), info=self.info),
            data={"mean_logit": h.mean_logit, "log_z": h.log_z, "log_z_max": h.log_z_max, "logit_max": h.logit_max,
                  "logit_min": h.logit_min, "start_mean_logit": mu0, "start_log_z": z0, "drift_mean_logit": d_mu,
                  "drift_log_z": d_z, "rows": h.rows},
        )

    def _head_lr(self, name: str) -> float | None:
        for p in (f"{name}.weight", f"{name}.bias"):
            lr = self.ctx.lr(p) if hasattr(self.ctx, "lr") else None
            if lr:
                return lr
        return None

    def state_dict(self) -> dict:
        return {"start": {k: list(v) for k, v in self.start.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.start.update({k: (float(v[0]), float(v[1])) for k, v in state.get("start", {}).items()})


for _key, _th in LogitDivergence.thresholds.items():  # `thresholds:` entries naming it validate without a monitor
    register_threshold(_key, _th, LogitDivergence.summary)
