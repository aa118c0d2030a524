"""Gradient rules: zero fraction, missing, non-finite, norm spikes, vanishing, and the dying trend.

All of them read the per-parameter gradient statistics of sampled steps (``record.grads``) — host-side
floats already transferred by the monitor — and keep short per-parameter histories.

A step whose gradients say nothing about the model is left out of all but ``grad.nonfinite``
(:func:`judged_step`): one the ``GradScaler`` skipped (mixed precision's normal overflow; ``rules/amp.py``
judges how often), and one with a non-finite gradient, where ``clip_grad_norm_`` has multiplied every
gradient by 0 (finite entries) or NaN: those zeros are clipping's, not dead units.
"""

from __future__ import annotations

import math
from typing import ClassVar

from stethoscope.record import StepRecord
from stethoscope.rules import hints as H
from stethoscope.rules._series import Series, geomean, kendall_tau, mean, median, theil_sen
from stethoscope.rules.base import Rule, RuleContext, register_rule
from stethoscope.rules.thresholds import Threshold
from stethoscope.sampling import SpikeDetector
from stethoscope.stats import Stats

# Below this many eps of RMS, "|g| <= eps" counts small gradients, not dead ones (grad.vanishing's case).
MIN_RMS_IN_EPS = 100.0


def judged_step(record: StepRecord) -> bool:
    """Whether this step's gradients describe the model: not when the GradScaler skipped the step (its
    gradients overflowed on purpose and never reached the optimizer), nor when any gradient is non-finite
    (``grad.nonfinite``'s case: ``clip_grad_norm_`` then sees a non-finite total norm and multiplies every
    gradient by 0 — an Inf norm — or NaN, so the other gradients' zeros and norms are the clipping's)."""
    if record.scaler_skipped:
        return False
    return not any(rec.stats.nonfinite > 0 for rec in record.grads.values())


def rms(stats: Stats) -> float:
    n = stats.count - stats.nonfinite
    return stats.norm / math.sqrt(n) if n > 0 and stats.norm == stats.norm else math.nan


def excess_zero_fraction(
    rule: Rule, name: str, stats: Stats, min_rms_in_eps: float = MIN_RMS_IN_EPS
) -> float | None:
    """The zero fraction of a gradient beyond what is known to be normal, or None when not judged.

    ``stats.zero_fraction`` of a gradient row is the share of entries that are exactly zero (the monitor
    reads gradients with eps 0; docs/findings.md says why). Embedding weights are skipped (rows of tokens
    absent from the batch get no gradient). A fused q,k,v bias holds a key part (``share`` of it) whose
    gradient is zero under softmax only up to rounding: it is exactly zero, and counted, when nothing reaches
    the scores, and a residue ~1e-9 otherwise. So the zeros of the rest are ``(zf - share) / (1 - share)``
    when the count covers the key part (``zf >= share``) and ``zf / (1 - share)`` when it cannot (the smaller
    reading the count allows). Gradients whose non-zero entries have an RMS under
    ``min_rms_in_eps * stats.eps`` (100 by default) are skipped: so small a gradient is grad.vanishing's
    case, and low-precision underflow (exact zeros from float16's 6e-8) is near. An all-zero gradient
    (norm exactly 0) is 1.
    """
    pi = rule.info.params.get(name)
    zf = stats.zero_fraction
    if zf != zf or stats.count == 0:
        return None
    if pi is not None and pi.embedding:
        return None
    share = pi.key_bias_share if pi is not None else 0.0
    if share >= 1.0:
        return None
    finite = stats.count - stats.nonfinite
    if zf >= 1.0:  # every entry under eps: dead if exactly zero, merely tiny otherwise
        return 1.0 if stats.norm == 0 else None
    rms_alive = stats.norm / math.sqrt(finite * (1.0 - zf))  # RMS of the entries that are not zero
    if not (rms_alive >= min_rms_in_eps * rule.ctx.eps):
        return None
    if zf >= share:  # the key part may be among the zeros (exactly zero by design): the rest's zeros
        return (zf - share) / (1.0 - share)
    return zf / (1.0 - share)  # the key part cannot all be zero: every counted zero is in the rest


def biases_before_norm(rule: Rule, record: StepRecord) -> set[str]:
    """Biases of modules whose output goes straight into a batch/instance norm (learned from call order).

    The norm subtracts each channel's mean over the batch, so such a bias has no effect and its gradient is
    zero up to rounding (~1e-9): normal, like the key-projection bias of softmax attention.
    """
    known: set[str] = rule.ctx.shared.setdefault("biases_before_norm", set())
    calls = record.act_calls
    for i in range(1, len(calls)):
        if rule.info.removes_bias(calls[i][0]):
            bias = f"{calls[i - 1][0]}.bias" if calls[i - 1][0] else "bias"
            if bias in rule.info.params:
                known.add(bias)
    return known


def _owner(rule: Rule, name: str) -> str:
    pi = rule.info.params.get(name)
    return pi.owner if pi is not None and pi.owner else name.rpartition(".")[0] or name


@register_rule
class GradZeroFraction(Rule):
    """``grad.zero_fraction``: the playbook's "Recent avg zeros" for every parameter.

    Value: the share of the gradient's entries that are exactly zero, beyond the known-normal zeros,
    averaged over the last ``rules.smoothing`` sampled steps. Defaults from the field note: under 5 %
    healthy, 5–10 % warning, 10 % and over critical. Steps the GradScaler skipped and steps with a
    non-finite gradient are left out (:func:`judged_step`).
    """

    code = "grad.zero_fraction"
    order = 10
    thresholds: ClassVar[dict[str, Threshold]] = {"grad.zero_fraction": Threshold(0.05, 0.10)}
    summary = "share of a parameter's gradient that is exactly zero (dead units), recent average"

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.recent = Series(self.settings.smoothing)

    def check(self, record: StepRecord) -> None:
        if not judged_step(record):
            return
        step = record.step
        zero_matrix = self._zero_matrix(record)
        before_norm = biases_before_norm(self, record)
        for name, rec in record.grads.items():
            if name in before_norm:
                self.note(
                    name,
                    step,
                    rec.stats.zero_fraction,
                    f"`{name}` is added just before a batch "
                    "normalisation, which subtracts each channel's mean: it has no effect and no "
                    "gradient; normal (drop it with bias=False)",
                )
                continue
            value = excess_zero_fraction(self, name, rec.stats)
            if value is None:
                self._explain(name, rec.stats, step)
                continue
            if zero_matrix and rec.stats.norm == 0:
                self.note(
                    name,
                    step,
                    1.0,
                    f"the gradient of `{name}` is exactly zero while `{zero_matrix}` is "
                    "still all zeros (a zero-initialised layer such as LoRA's B): nothing flows back "
                    "through it until it moves; normal at the start",
                )
                continue
            self._explain_fused(name, rec.stats, step)
            value = mean([v for _, v in self.recent.push(name, step, value)])
            self.judge(
                name,
                value,
                step,
                message=lambda n=name, v=value, s=rec.stats: self._message(n, v, s),
                hint=lambda n=name: self._hint(n),
            )

    def _zero_matrix(self, record: StepRecord) -> str | None:
        """A weight matrix that is exactly zero now (zero-initialised): gradients behind it are zero too."""
        for name, u in record.updates.items():
            pi = self.info.params.get(name)
            if u.weight_norm == 0 and pi is not None and pi.ndim >= 2:
                return name
        return None

    def state_dict(self) -> dict:
        return {"recent": self.recent.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.recent.load_state_dict(state.get("recent", {}))

    def _explain(self, name: str, stats: Stats, step: int | None) -> None:
        pi = self.info.params.get(name)
        zf = stats.zero_fraction
        level = self.threshold(name).shown
        if pi is None or zf != zf or zf < (level if level is not None else 0.05):
            return
        if pi.embedding:
            self.note(
                name,
                step,
                zf,
                f"{H.pct(zf)} of the gradient of embedding `{name}` is zero: rows of "
                "tokens (or positions) absent from the batch get no gradient; this is normal",
            )
        elif pi.key_bias_share >= 1.0:
            self.note(
                name,
                step,
                zf,
                f"`{name}` is a key-projection bias: softmax ignores a constant added "
                "to a row of scores, so its gradient is exactly zero; this is normal, not attention death",
            )

    def _explain_fused(self, name: str, stats: Stats, step: int | None) -> None:
        """The field note's '33 % zeros in in_proj_bias': say (on request) that the key part is normal.

        Said whatever the count: the key part's gradient is exactly zero only when nothing reaches the scores,
        a rounding residue (~1e-9) otherwise — not counted as zero here, but what the field note's |g| < 1e-8
        counted."""
        pi = self.info.params.get(name)
        share = pi.key_bias_share if pi is not None else 0.0
        zf = stats.zero_fraction
        if not 0 < share < 1 or zf != zf:
            return
        self.note(
            name,
            step,
            zf,
            f"{H.pct(share)} of `{name}` is the key-projection bias of a fused q,k,v projection: softmax ignores a "
            "constant added to a row of scores, so that part gets no gradient (exactly zero in theory, a rounding "
            "residue of ~1e-9 in practice, which a |g| < 1e-8 count reads as zero). This is the "
            f"familiar '33 % zeros in in_proj_bias' — normal, not attention death; {H.pct(zf)} of the bias's entries are "
            "exactly zero now, and the rule judges only the rest of the bias",
        )

    def _message(self, name: str, value: float, stats: Stats) -> str:
        n = len(self.recent.values(name))
        pi = self.info.params.get(name)
        text = (
            f"{H.pct(value)} of the gradient entries of `{name}` are exactly zero, "
            f"averaged over the last {n} sampled step{'s' if n != 1 else ''}: units that pass no gradient"
        )
        if pi is not None and pi.key_bias_share > 0:
            text += (
                f". `{name}` holds a key-projection bias: its key part ({H.pct(pi.key_bias_share)} of the "
                "entries) gets no gradient under softmax — normal, the familiar '33 % zeros "
                "in in_proj_bias' — and is left out of this figure; the rest is not normal"
            )
        return text

    def _hint(self, name: str) -> str:
        owner = _owner(self, name)
        return H.hint(self.code, module=owner, lr=self.ctx.lr(name), info=self.info)


def _within(module: str, names: set[str]) -> str | None:
    """The outermost of ``module`` and its ancestors that is in ``names`` (``""`` is the root), or None."""
    if not names:
        return None
    parts = module.split(".") if module else []
    for i in range(len(parts) + 1):
        candidate = ".".join(parts[:i])
        if candidate in names:
            return candidate
    return None


@register_rule
class GradMissing(Rule):
    """``grad.missing``: a trainable parameter that got no gradient in a step that had a backward pass.

    Value: sampled steps in a row (with a backward pass) in which ``param.grad`` was None. Warning from the
    first, critical from the third. Steps without any gradient (no backward yet, evaluation) are skipped.
    """

    code = "grad.missing"
    order = 11
    thresholds: ClassVar[dict[str, Threshold]] = {"grad.missing": Threshold(1, 3)}
    summary = "trainable parameter with no gradient (unused in forward, detached, or frozen by mistake)"

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.streak: dict[str, int] = {}

    def check(self, record: StepRecord) -> None:
        if not record.grads or record.scaler_skipped:  # no backward (or a skipped one): nothing is "missing"
            return
        step = record.step
        ran = {c[0] for c in record.act_calls}
        no_grad = set(record.forward_modes.get("no_grad", ()))
        recomputed = set(record.forward_modes.get("recomputed", ()))
        for name in record.missing_grads:
            n = self.streak.get(name, 0) + 1
            self.streak[name] = n
            owner = _owner(self, name)
            # how its module ran: with autograd off (torch.no_grad, or a reentrant checkpoint's first pass),
            # and again inside backward (the checkpoint's recomputation)
            off = _within(owner, no_grad)
            how = "checkpoint" if off is not None and _within(owner, recomputed) is not None else (
                "no_grad" if off is not None else None)
            if how is None and owner in ran and self._computed_but_unused_by_design(owner):
                self.note(name, step, n, f"`{name}` gets no gradient: `{owner}` belongs to a transformers pooler, computed "
                          "in every forward but used only by classification heads — a loss on last_hidden_state "
                          "ignores it. Normal; freeze it to save its optimizer state")
                continue
            self.judge(
                name,
                n,
                step,
                message=lambda name=name, n=n, owner=owner, how=how, off=off: self._message(
                    name, n, owner, ran, record, how, off),
                hint=lambda name=name, owner=owner, how=how, off=off: self._hint(name, owner, how, off),
                data={"ran_without_grad": off} if off is not None else None,
            )
        for name in record.grads:
            if self.streak.pop(name, 0):
                self.release(name, step, 0)

    def _computed_but_unused_by_design(self, module: str) -> bool:
        """Inside a transformers pooler (``BertPooler``, ``RobertaPooler``, ...): the base model always computes
        ``pooler_output``; only a sequence-classification head reads it."""
        parts = module.split(".")
        return any(self.info.module_types.get(".".join(parts[:i]), "").endswith("Pooler")
                   for i in range(len(parts), 0, -1))

    def _message(self, name: str, n: int, owner: str, ran: set, record: StepRecord, how: str | None = None,
                 off: str | None = None) -> str:
        text = (
            f"`{name}` requires grad but got no gradient in {n} sampled step{'s' if n != 1 else ''} in a "
            "row, while the rest of the model did"
        )
        if how == "checkpoint":
            text += (
                f"; `{off or '<model>'}` runs inside a reentrant activation checkpoint (its forward runs with "
                "autograd off, the checkpoint recomputes it in backward only for inputs that require grad) and "
                "its input needs no gradient (a frozen embedding, say), so nothing flows back into it"
            )
        elif how == "no_grad":
            text += f"; `{off or '<model>'}` ran its forward with autograd off (inside torch.no_grad() or similar)"
        elif record.act_calls:
            if owner in ran:
                text += (
                    f"; its module `{owner}` ran in forward, so its output does not reach the loss, or "
                    "it is cut off by .detach(), torch.no_grad() or .data"
                )
            else:
                text += f"; its module `{owner}` produced no output this step: it is probably never called"
        return text

    def _hint(self, name: str, owner: str, how: str | None = None, off: str | None = None) -> str:
        pi = self.info.params.get(name)
        leave_out = "" if pi is None or pi.group is None else " and leave it out of the optimizer"
        if how == "checkpoint":
            return H.hint(self.code, "checkpoint")
        if how == "no_grad":
            return H.hint(self.code, "no_grad", module=off or "<model>", leave_out=leave_out)
        return H.hint(self.code, name=name, module=owner, leave_out=leave_out)

    def state_dict(self) -> dict:
        return {"streak": dict(self.streak)}

    def load_state_dict(self, state: dict) -> None:
        self.streak = {k: int(v) for k, v in state.get("streak", {}).items()}


@register_rule
class GradNonfinite(Rule):
    """``grad.nonfinite``: NaN or ±Inf entries in a parameter's gradient.

    Value: the number of non-finite entries. Critical from one. With a ``GradScaler`` handed to the
    monitor, a step it skipped while the loss was finite (or not logged) is how the scaler works — float16
    gradients overflowed at the current scale, the optimizer did not run, the scale halves — and is not
    judged here: ``amp.skips`` and ``amp.scale_collapse`` say when the skipping is no longer normal. A
    non-finite loss stays critical, skipped or not: no scale repairs it. When the monitor has a scaler but
    no skip information for the step (the scaler did not step inside ``mon.step``), only a streak of 3
    sampled steps in a row is reported. Without a scaler (bfloat16 autocast, float32) nothing skips the
    step: a non-finite gradient reaches the optimizer and is critical at once.
    """

    code = "grad.nonfinite"
    order = 4
    thresholds: ClassVar[dict[str, Threshold]] = {"grad.nonfinite": Threshold(1, 1)}
    summary = "NaN or Inf in a parameter's gradient"
    SCALER_PATIENCE = 3

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.streak = 0

    def check(self, record: StepRecord) -> None:
        bad = [(name, rec.stats) for name, rec in record.grads.items() if rec.stats.nonfinite > 0]
        step = record.step
        if not bad:
            self.streak = 0
            for target in self.open_targets():
                self.release(target, step, 0)
            return
        loss = record.scalars.get("loss")
        loss_finite = loss is None or math.isfinite(loss)
        if record.scaler_skipped and loss_finite:  # the scaler's normal overflow: it skipped this step
            self.streak = 0
            self.note("", step, len(bad), f"{len(bad)} of {len(record.grads)} parameters have non-finite "
                      "gradients in a step the GradScaler skipped, with a finite loss: float16 gradients "
                      "overflowed at the current loss scale, the optimizer did not run and the scale halves; "
                      "normal (amp.skips and amp.scale_collapse say when it is not)")
            for target in self.open_targets():
                self.release(target, step, 0)
            return
        self.streak += 1
        unknown = record.amp is None or record.amp.skipped is None  # no skip information for this step
        if unknown and self.info.scaler and self.streak < self.SCALER_PATIENCE and loss_finite:
            return
        total = len(record.grads)
        for name, st in bad:
            self.judge(
                name,
                st.nonfinite,
                step,
                message=lambda name=name, st=st: self._message(name, st, len(bad), total, loss),
                hint=lambda name=name: self._hint(name, loss),
                data={"parameters_nonfinite": len(bad), "parameters": total},
            )
        bad_names = {n for n, _ in bad}
        for target in self.open_targets():
            if target not in bad_names:
                self.release(target, step, 0)

    def _message(self, name: str, st: Stats, n_bad: int, total: int, loss: float | None) -> str:
        text = (
            f"{st.nonfinite} of {st.count} gradient entries of `{name}` are NaN or Inf; {n_bad} of "
            f"{total} parameters have non-finite gradients this step"
        )
        if loss is not None:
            text += f"; the loss was {'finite' if math.isfinite(loss) else 'non-finite'} ({H.fmt(loss)})"
        if self.info.scaler and loss is not None and not math.isfinite(loss):
            text += "; the GradScaler skips such steps, but the loss itself is non-finite: no scale repairs it"
        elif self.info.scaler:
            text += f"; the GradScaler has skipped {self.streak} sampled steps in a row"
        return text

    def _hint(self, name: str, loss: float | None) -> str:
        origin = self.ctx.shared.get("nonfinite_origin")
        lr = self.ctx.lr(name)
        if origin:
            return H.hint(self.code, "forward", origin=origin, lr=lr, info=self.info)
        if loss is not None and math.isfinite(loss):
            return H.hint(self.code, "backward", lr=lr, info=self.info)
        return H.hint(self.code, lr=lr, info=self.info)

    def state_dict(self) -> dict:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state.get("streak", 0))


@register_rule
class GradNormSpike(Rule):
    """``grad.norm_spike``: the global gradient norm far above its robust running baseline.

    Value: the total gradient norm / the median of the last ``rules.window`` non-spiking sampled steps (the
    same robust median as the monitor's anomaly sampling), judged from the second sampled step on.
    Warning at 10× once it lasts 2 sampled steps in a row (the monitor samples the steps after a spike), so
    one outlier batch that is gone at the next step stays silent; critical at 100× at once, or when it stays
    past the warning level for 5 sampled steps in a row (a bad batch spikes once; a far too high learning
    rate never comes back down). The norm is the whole model's, so the target is the root module
    (``""``, as ``named_modules()`` names it); the message and ``data.culprit`` name the parameter whose own
    gradient norm jumped the most against its own median.
    """

    code = "grad.norm_spike"
    order = 5  # before the per-parameter rules, so their findings can say they follow a spike
    thresholds: ClassVar[dict[str, Threshold]] = {"grad.norm_spike": Threshold(10.0, 100.0)}
    summary = "global gradient norm spikes against its running median"
    CONFIRM = 2  # a spike under the critical level must last this many sampled steps in a row to open
    SUSTAINED = 5  # a spike that lasts this many sampled steps in a row is critical whatever its size

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        th = self.threshold("")
        factor = th.warning if th.warning is not None and math.isfinite(th.warning) else math.inf
        # judged from the second sampled step: with a far too high learning rate the very first update
        # wrecks the weights, and every later norm is already "the new normal"
        self.baseline = SpikeDetector(factor, window=self.settings.window, min_history=1)
        self.param_norms = Series(self.settings.window)
        self.episode: str | None = None  # "" while a spike is open
        self.since: int | None = None  # the step it opened
        self.streak = 0  # sampled steps in a row above the warning level

    def check(self, record: StepRecord) -> None:
        if not record.grads or not judged_step(record):
            return  # grad.nonfinite (and, for skipped steps, amp.*) speaks for non-finite gradients
        step = record.step
        gn = record.grad_norm
        med = self.baseline.median()
        th = self.threshold("")
        ratio = gn / med if med == med and med > 0 else math.nan
        spiking = self.baseline.check(gn) and ratio == ratio
        if not spiking:
            if self.episode is None and self.streak:  # an unconfirmed spike is over
                self._withdraw()
            self.streak = 0
            for name, rec in record.grads.items():
                self.param_norms.push(name, step, rec.stats.norm)
            if self.episode is not None and (ratio != ratio or th.healthy(ratio, self.clear_factor)):
                self.release(self.episode, step, ratio)
                self.episode = None
                self._withdraw()
            return
        self.streak += 1
        sustained = self.streak >= self.SUSTAINED
        if self.streak == 1 and self.episode is None:
            self.since = step
            self._announce()  # what else opens in this step happens during the spike, confirmed or not
        if self.episode is None and self.streak < self.CONFIRM and th.severity(ratio) != "critical":
            return  # one spiking batch that may be gone at the next sampled step: wait for it
        self.episode = ""
        culprit = self._culprit(record)
        own = self._own_ratio(culprit, record)
        streak = self.streak
        self.judge(
            "",
            ratio,
            step,
            severity="critical" if sustained else None,
            message=lambda: (
                f"the total gradient norm {H.fmt(gn)} is {H.fmt(ratio)}× its running median "
                f"{H.fmt(med)} (last {len(self.baseline.history)} sampled steps); the largest "
                f"jump is in `{culprit}` ({H.fmt(own)}× its own median)"
                + (
                    f"; it has stayed up for {streak} sampled steps in a row: the run is not recovering"
                    if sustained
                    else ""
                )
            ),
            hint=lambda: H.hint(self.code, lr=self.ctx.lr(culprit), info=self.info, max_norm=H.fmt(3 * med),
                                typical=med),
            data={"grad_norm": gn, "median": med, "culprit": culprit, "culprit_ratio": own},
        )

    def _withdraw(self) -> None:
        if self.ctx.shared.get("cause", {}).get("code") == self.code:
            self.ctx.shared.pop("cause")

    def _announce(self) -> None:
        """Tell the other rules a run-wide problem is open: what opens now is likely its consequence."""
        self.ctx.shared["cause"] = {
            "code": self.code,
            "target": "",  # the whole model's norm: the finding it opens is on the root module
            "step": self.since,
            "what": "a gradient-norm spike",
        }

    def _own_ratio(self, name: str, record: StepRecord) -> float:
        rec = record.grads.get(name)
        base = median(self.param_norms.values(name))
        return rec.stats.norm / base if rec is not None and base == base and base > 0 else math.nan

    def _culprit(self, record: StepRecord) -> str:
        best, best_r = None, -1.0
        for name in record.grads:
            r = self._own_ratio(name, record)
            if r == r and r > best_r:
                best, best_r = name, r
        if best is None:  # no per-parameter history: the largest contributor
            best = max(record.grads, key=lambda n: record.grads[n].stats.norm)
        return best

    def state_dict(self) -> dict:
        return {
            "baseline": self.baseline.state_dict(),
            "params": self.param_norms.state_dict(),
            "episode": self.episode,
            "streak": self.streak,
            "since": self.since,
        }

    def load_state_dict(self, state: dict) -> None:
        self.baseline.load_state_dict(state.get("baseline", {}))
        self.param_norms.load_state_dict(state.get("params", {}))
        self.episode = state.get("episode")
        self.streak = int(state.get("streak", 0))
        self.since = state.get("since")
        if self.episode is not None or self.streak:
            self._announce()


def peer_key(name: str) -> str:
    """The name with its layer indices wildcarded: ``h.3.mlp.c_fc.weight`` -> ``h.*.mlp.c_fc.weight``."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


@register_rule
class GradVanishing(Rule):
    """``grad.vanishing``: a parameter whose gradient is orders of magnitude below its peers'.

    Value: the parameter's gradient RMS over a reference, geometric mean over the last ``rules.smoothing``
    sampled steps; lower is worse: warning at 1e-2 (100× below), critical at 1e-3 (1000× below). The
    reference is the median RMS of its peers — the same parameter in the model's other repeated blocks
    (``h.*.mlp.c_fc.weight``) — or the median over all the model's parameters, whichever gives the smaller
    value, but against the whole model the ratio is multiplied by 100 (a 100× stricter bar): parameter kinds
    differ naturally, e.g. at initialisation a from-scratch BERT's query and key weights get ~1e-3 of the
    median gradient (each is scaled by the other's small weights) in every layer alike, which is normal.
    Peers catch one block starving; the model-wide bar catches a group of peers starving together.
    Embeddings, key-projection biases, biases just before a batch norm and exactly-zero gradients
    (grad.zero_fraction's case) are left out. In healthy runs the smallest peer ratio is 0.16–0.4 and the
    smallest model-wide ratio about 0.07.
    """

    code = "grad.vanishing"
    order = 14
    thresholds: ClassVar[dict[str, Threshold]] = {
        "grad.vanishing": Threshold(1e-2, 1e-3, higher_is_worse=False)
    }
    summary = "gradient RMS of a parameter far below its peers' / the model's median"
    MIN_PARAMS = 4
    MODEL_WIDE_SLACK = 100.0

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.recent = Series(self.settings.smoothing)

    def _eligible(self, name: str) -> bool:
        pi = self.info.params.get(name)
        return pi is None or (not pi.embedding and pi.key_bias_share < 1.0)

    def check(self, record: StepRecord) -> None:
        if not judged_step(record):
            return
        rmss = {}
        before_norm = biases_before_norm(self, record)
        for name, rec in record.grads.items():
            if self._eligible(name) and name not in before_norm:
                r = rms(rec.stats)
                if r == r and math.isfinite(r) and r > 0:  # exactly zero: dead, grad.zero_fraction's case
                    rmss[name] = r
        if len(rmss) < self.MIN_PARAMS:
            return
        med = median(list(rmss.values()))
        if not med > 0:
            return
        groups: dict[str, list[float]] = {}
        for name, r in rmss.items():
            groups.setdefault(peer_key(name), []).append(r)
        step = record.step
        for name, r in rmss.items():
            peers = groups[peer_key(name)]
            # against the whole model the bar is 100x stricter: parameter kinds differ by ~1000x naturally
            ratio, ref = self.MODEL_WIDE_SLACK * r / med, med
            against = (
                f"the model's median parameter gradient (held to a {self.MODEL_WIDE_SLACK:g}× stricter bar)"
            )
            if len(peers) >= 2:
                peer_med = median(peers)
                if r / peer_med < ratio:
                    ratio, ref = r / peer_med, peer_med
                    against = f"the median of its {len(peers)} peers `{peer_key(name)}`"
            value = geomean([v for _, v in self.recent.push(name, step, ratio)])
            self.judge(
                name,
                value,
                step,
                message=lambda name=name, r=r, ref=ref, against=against: (
                    f"the gradient reaching `{name}` (RMS {H.fmt(r)}) is {H.fmt(r / ref)}× {against} "
                    f"({H.fmt(ref)}): the learning signal dies before it gets there"
                ),
                hint=lambda name=name: self._hint(name),
            )

    def _hint(self, name: str) -> str:
        owner = _owner(self, name)
        return H.hint(self.code, module=owner, info=self.info, typical=None)

    def state_dict(self) -> dict:
        return {"recent": self.recent.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.recent.load_state_dict(state.get("recent", {}))


@register_rule
class GradDeadTrend(Rule):
    """``grad.dead_trend``: a parameter's zero-gradient fraction rising steadily over the window.

    The playbook's "progressive death" (2–5 % → 10–25 % → 40 %+): caught while the level is still under
    ``grad.zero_fraction``'s threshold. Value: the rise of the (known-normal-corrected) zero fraction
    across the window, from a robust (Theil–Sen) slope; it counts only when the rise is monotone (Kendall
    tau >= 0.6 over at least ``rules.min_history`` sampled steps) and the fraction is already at least 1 %.
    Warning at a rise of 2 points, critical at 10 points.
    """

    code = "grad.dead_trend"
    order = 15
    thresholds: ClassVar[dict[str, Threshold]] = {"grad.dead_trend": Threshold(0.02, 0.10)}
    summary = "zero-gradient fraction rising steadily (progressive death), before it crosses its threshold"
    MIN_TAU = 0.6
    FLOOR = 0.01
    # a trend is read at the 1-3 % level: judge only gradients whose live entries have an RMS of 1000 eps
    # (1e-5) or more, far from where low-precision gradients start to underflow into exact zeros
    MIN_RMS_IN_EPS = 1000.0

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.history = Series(self.settings.window)
        self.scale = Series(self.settings.window)

    def check(self, record: StepRecord) -> None:
        if not judged_step(record):
            return
        step = record.step
        before_norm = biases_before_norm(self, record)
        for name, rec in record.grads.items():
            if name in before_norm:
                continue
            value = excess_zero_fraction(self, name, rec.stats, self.MIN_RMS_IN_EPS)
            if value is None:
                continue
            points = self.history.push(name, step, value)
            self.scale.push(name, step, rms(rec.stats))
            if len(points) < max(3, self.settings.min_history):
                continue
            if max(v for _, v in points) <= 0.0:
                if self.is_open(name):
                    self.release(name, step, 0.0)
                continue
            scales = self.scale.values(name)
            rise, tau, current = self._trend(points)
            if current < self.FLOOR or tau < self.MIN_TAU or self._shrinking(scales):
                rise = min(rise, 0.0)
            self.judge(
                name,
                rise,
                step,
                message=lambda name=name, rise=rise, tau=tau, cur=current, pts=points: self._message(
                    name, rise, tau, cur, pts
                ),
                hint=lambda name=name: self._hint(name),
                data={"zero_fraction": current, "tau": tau, "points": len(points)},
            )

    @staticmethod
    def _shrinking(scales: list[float]) -> bool:
        """The gradient's RMS fell by more than half across the window: the whole gradient got smaller
        (grad.vanishing's business; in low precision more entries underflow to zero), not because units
        died. Dying units lower the RMS only by sqrt(alive share)."""
        k = max(1, len(scales) // 3)
        return median(scales[-k:]) < 0.5 * median(scales[:k])

    @staticmethod
    def _trend(points: list[tuple[int, float]]) -> tuple[float, float, float]:
        slope = theil_sen(points)
        span = points[-1][0] - points[0][0]
        tail = [v for _, v in points[-3:]]
        return slope * span, kendall_tau(points), median(tail)

    def _message(self, name: str, rise: float, tau: float, current: float, points: list) -> str:
        first, last = points[0][0], points[-1][0]
        zf_th = self.ctx.resolver.resolve("grad.zero_fraction", name)
        slope = rise / max(1, last - first)
        ahead = ""
        if (
            slope > 0
            and zf_th.critical is not None
            and math.isfinite(zf_th.critical)
            and current < zf_th.critical
        ):
            steps = (zf_th.critical - current) / slope
            ahead = (
                f"; at this pace it crosses the critical {H.pct(zf_th.critical)} in about {steps:.0f} steps"
            )
        return (
            f"the zero-gradient fraction of `{name}` rose by {100 * rise:.1f} points between steps {first} and "
            f"{last} (now {H.pct(current)}, trend tau {tau:.2f}): the progressive-death pattern{ahead}"
        )

    def _hint(self, name: str) -> str:
        owner = _owner(self, name)
        return H.hint(self.code, module=owner, lr=self.ctx.lr(name), info=self.info)

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict(), "scale": self.scale.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state.get("history", {}))
        self.scale.load_state_dict(state.get("scale", {}))
