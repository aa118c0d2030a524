"""What one flushed step looks like on the host: the input every rule reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stethoscope.stats import Stats


@dataclass
class ActRecord:
    """Statistics of one module output (all calls of the step merged, unless ``stats.per_call``)."""

    name: str
    output: str  # path inside a structured output, "" for a bare tensor
    calls: int
    stats: Stats
    call: int | None = None  # the call index when stats.per_call is on


@dataclass
class GradRecord:
    name: str
    stats: Stats


@dataclass
class UpdateRecord:
    name: str
    update_norm: float
    weight_norm: float
    ratio: float  # ‖Δw‖ / ‖w‖
    # False: not copied this step (stats.update_budget_mb's round-robin); update_norm and ratio are NaN then,
    # weight_norm is still this step's
    measured: bool = True


@dataclass
class AmpRecord:
    """What the ``GradScaler`` did, read at a sampled step without a sync (``monitor/gradients.py``)."""

    scale: float  # the loss scale after this step's scaler.update()
    skipped: bool | None  # this step's optimizer step was skipped (non-finite gradients); None: no scaler step
    history: list[bool] = field(default_factory=list)  # each scaler step since the last record (skipped?), in
    # order, this step's last
    folded_steps: int = 0  # older scaler steps of that stretch, counted but not ordered (very sparse sampling)
    folded_skips: int = 0


@dataclass
class StepRecord:
    """One step as the rules see it. Unsampled steps carry only scalars."""

    step: int | None
    sampled: bool
    epoch: int | None = None
    scalars: dict[str, float] = field(default_factory=dict)
    acts: dict[tuple, ActRecord] = field(default_factory=dict)  # (name, output, call) -> record
    inputs: dict[tuple, ActRecord] = field(default_factory=dict)  # inputs of linear layers
    grads: dict[str, GradRecord] = field(default_factory=dict)
    missing_grads: list[str] = field(default_factory=list)
    # how modules ran on a sampled step: "no_grad" (training mode, autograd off) and "recomputed" (inside
    # backward: activation checkpointing) module names; see ForwardObserver.modes
    forward_modes: dict[str, list[str]] = field(default_factory=dict)
    updates: dict[str, UpdateRecord] = field(default_factory=dict)
    # Every module call in finish order (post-hook order: a child before its parent):
    # (name, output path, call index, non-finite count, inputs were finite). The count is of the output's
    # entries (NaN or ±Inf); "inputs were finite" means no entry of any floating input (args and kwargs) was
    # NaN or ±Inf, however large the finite ones (1e37 in float32 is finite; its sum is not).
    act_calls: list[tuple[str, str, int, float, bool]] = field(default_factory=list)
    # Rows of kinds the monitor does not read itself, queued by extensions on the step's collector:
    # kind -> [(Entry, host row)] in queue order (e.g. "attn": per-head attention statistics).
    extras: dict[str, list] = field(default_factory=dict)
    amp: AmpRecord | None = None  # with a GradScaler handed to the monitor, on sampled steps
    # set by the monitor's anomaly check before rules and extensions see the record: the running median of the
    # loss when the logged loss is finite and above stats.loss_spike times it (None otherwise)
    loss_spike_median: float | None = None

    @property
    def scaler_skipped(self) -> bool:
        """The GradScaler skipped this step's optimizer step (its gradients were non-finite); False if unknown."""
        return self.amp is not None and bool(self.amp.skipped)

    @property
    def grad_norm(self) -> float:
        """Global L2 norm of every read gradient; NaN when any gradient holds a NaN or Inf (as
        ``clip_grad_norm_``'s total norm would be non-finite: a norm over the finite entries only would read
        as healthy, even 0, while every entry is NaN)."""
        total = 0.0
        for rec in self.grads.values():
            if rec.stats.nonfinite > 0:
                return math.nan
            n = rec.stats.norm
            if n == n:
                total += n * n
        return math.sqrt(total)

    def nonfinite_origin(self) -> tuple[str, str, int] | None:
        """The first module call to finish with a non-finite output while its inputs were finite.

        Finite-but-huge inputs count as finite, so a value that overflows inside a module (a LayerNorm's
        variance of a residual stream near float32's limit) is that module's, not a parent's.
        """
        for name, output, call, nonfinite, inputs_finite in self.act_calls:
            if nonfinite > 0 and inputs_finite:
                return name, output, call
        return None
