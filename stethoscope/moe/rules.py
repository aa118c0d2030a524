"""The routing-health rules: one finding per router, the experts concerned in its data.

Driven by the MoE extension with :class:`RouterWindow` summaries rather than step records. The load rules
judge the tokens each expert received summed over the last ``moe.window`` sampled steps (one step of a small
batch says little about a 64-expert layer); the router rules judge the last ``rules.smoothing`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stethoscope.rules import hints as H
from stethoscope.rules.base import Rule
from stethoscope.rules.thresholds import Threshold, register_threshold

# the coefficients the literature uses
AUX_LOSS_COEF = 1e-2  # Switch Transformer's load-balancing loss α (Fedus et al. 2021); HF router_aux_loss_coef
ROUTER_Z_COEF = 1e-3  # ST-MoE's router z-loss (Zoph et al. 2022)


@dataclass
class RouterWindow:
    """One router's statistics: the window's loads and the last steps' router figures."""

    name: str
    experts: int
    top_k: int
    load: list[float]  # tokens per expert over the window (E,)
    tokens: float  # tokens routed over the window
    steps: int  # sampled steps in the window
    entropy: float  # mean per-token router entropy / log E, last steps
    mean_entropy: float  # entropy of the mean router distribution / log E, last steps
    log_z_rms: float  # RMS over tokens of logsumexp(router logits), last steps
    logit_absmax: float
    capacity_factor: float
    extra: dict = field(default_factory=dict)

    @property
    def mean_load(self) -> float:
        return sum(self.load) / self.experts if self.experts else 0.0

    @property
    def judged(self) -> bool:
        """Enough tokens routed for a zero or a peak to mean something."""
        return self.extra.get("enough", True)


def _experts(items: list[int]) -> str:
    return ", ".join(str(e) for e in items[:12]) + (f" and {len(items) - 12} more" if len(items) > 12 else "")


class MoERule(Rule):
    """Base of the routing rules: ``check_routers`` replaces ``check``."""

    order: ClassVar[int] = 45

    def check(self, record: Any) -> None:
        return None

    def check_routers(self, step: int | None, routers: list[RouterWindow]) -> None:
        for r in routers:
            self.check_router(step, r)
        self.settle(step)

    def check_router(self, step: int | None, r: RouterWindow) -> None:
        raise NotImplementedError


class LoadImbalance(MoERule):
    code = "moe.load_imbalance"
    summary = "an expert gets far more tokens than the mean (max / mean load over the window)"
    thresholds: ClassVar[dict[str, Threshold]] = {"moe.load_imbalance": Threshold(2.5, 4.0)}

    def check_router(self, step, r):
        mean = r.mean_load
        if not r.judged or mean <= 0:
            return
        peak = max(r.load)
        ratio = peak / mean
        cv = math.sqrt(sum((x - mean) ** 2 for x in r.load) / r.experts) / mean
        capacity = r.capacity_factor * mean
        overflow = sum(max(0.0, x - capacity) for x in r.load) / max(sum(r.load), 1.0)
        busy = sorted(range(r.experts), key=lambda e: -r.load[e])
        busiest = [e for e in busy if r.load[e] > capacity]
        self.judge(
            r.name, ratio, step,
            message=lambda: (
                f"expert load is unbalanced in {r.name}: expert {busy[0]} gets {ratio:.1f}× the mean load "
                f"({int(peak)} of {int(sum(r.load))} routed slots over {r.steps} sampled steps; coefficient of "
                f"variation {cv:.2f}); at capacity factor {r.capacity_factor:g}, {overflow:.0%} of the routed "
                f"tokens would be dropped (experts over capacity: {_experts(busiest)})"
            ),
            hint=lambda: H.hint(self.code, aux=f"{AUX_LOSS_COEF:g}"),
            data={"load": [int(x) for x in r.load], "cv": cv, "max_over_mean": ratio, "overflow": overflow,
                  "capacity_factor": r.capacity_factor, "over_capacity": busiest, "steps": r.steps},
        )


class DeadExpert(MoERule):
    code = "moe.dead_expert"
    summary = "experts that received no token over the window"
    thresholds: ClassVar[dict[str, Threshold]] = {"moe.dead_expert": Threshold(1e-9, 0.25)}

    def check_router(self, step, r):
        if not r.judged:
            return
        dead = [e for e, x in enumerate(r.load) if x <= 0]
        share = len(dead) / r.experts
        self.judge(
            r.name, share, step,
            message=lambda: (
                f"{len(dead)} of {r.experts} experts of {r.name} received no token over the last {r.steps} sampled "
                f"steps ({int(r.tokens)} tokens routed, top-{r.top_k}): experts {_experts(dead)}"
            ),
            hint=lambda: H.hint(self.code, aux=f"{AUX_LOSS_COEF:g}"),
            data={"experts": dead, "load": [int(x) for x in r.load], "steps": r.steps, "tokens": int(r.tokens)},
        )


class RouterEntropy(MoERule):
    code = "moe.router_entropy"
    summary = ("the router's mean distribution over tokens sits on the same top-k experts: its entropy scaled from "
               "log k (0) to log(experts) (1), lower is worse")
    thresholds: ClassVar[dict[str, Threshold]] = {
        "moe.router_entropy": Threshold(0.25, 0.1, higher_is_worse=False)}

    def check_router(self, step, r):
        if r.experts <= r.top_k or not math.isfinite(r.mean_entropy):
            return
        self.judge(
            r.name, r.mean_entropy, step,
            message=lambda: (
                f"the router of {r.name} has collapsed: averaged over tokens it puts its probability on the same "
                f"{r.top_k} of {r.experts} experts (entropy {r.mean_entropy:.1%} of the way from log {r.top_k} to "
                f"log {r.experts}; per-token entropy {r.entropy:.1%} of log {r.experts}); every token then trains "
                f"the same experts"
            ),
            hint=lambda: H.hint(self.code, aux=f"{AUX_LOSS_COEF:g}", z=f"{ROUTER_Z_COEF:g}"),
            data={"entropy": r.entropy, "mean_entropy": r.mean_entropy, "log_z_rms": r.log_z_rms},
        )


class RouterLogits(MoERule):
    code = "moe.router_logits"
    summary = "the router's logits grew large: RMS over tokens of logsumexp(router logits)"
    thresholds: ClassVar[dict[str, Threshold]] = {"moe.router_logits": Threshold(10.0, 30.0)}

    def check_router(self, step, r):
        if not math.isfinite(r.log_z_rms):
            return
        self.judge(
            r.name, r.log_z_rms, step,
            message=lambda: (
                f"router logits of {r.name} are large: log Z is {r.log_z_rms:.1f} (RMS over tokens; "
                f"{math.log(r.experts):.2f} for uniform logits), largest |logit| {r.logit_absmax:.1f}; the ST-MoE "
                f"router z-loss would be {r.log_z_rms ** 2:.3g} × its coefficient"
            ),
            hint=lambda: H.hint(self.code, z=f"{ROUTER_Z_COEF:g}"),
            data={"log_z_rms": r.log_z_rms, "logit_absmax": r.logit_absmax, "router_z_loss": r.log_z_rms ** 2},
        )


RULES = (LoadImbalance, DeadExpert, RouterEntropy, RouterLogits)

for _cls in RULES:  # `thresholds:` entries naming them validate without a monitor
    for _key, _th in _cls.thresholds.items():
        register_threshold(_key, _th, _cls.summary)
