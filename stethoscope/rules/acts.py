"""Activation rules: dead features, saturated pre-activations, and the scale of features entering a layer.

They read module-output statistics (``record.acts``) and the statistics of the first float input of each
linear layer (``record.inputs``), in the post-hook order the monitor records (``record.act_calls``).
"""

from __future__ import annotations

from typing import ClassVar

from stethoscope.naming import make_filter, patterns
from stethoscope.record import ActRecord, StepRecord
from stethoscope.rules import hints as H
from stethoscope.rules._series import Series, mean
from stethoscope.rules.base import Rule, RuleContext, register_rule
from stethoscope.rules.model_info import is_saturating
from stethoscope.rules.thresholds import Threshold


def first_outputs(records: dict[tuple, ActRecord]) -> dict[str, list[ActRecord]]:
    """module name -> its output records in recorded order (post-hook order: a child before its parent)."""
    out: dict[str, list[ActRecord]] = {}
    for (name, _output, _call), rec in records.items():
        out.setdefault(name, []).append(rec)
    return out


def producers(record: StepRecord) -> dict[str, str]:
    """module -> the module whose call finished just before its first call (likely what fed it)."""
    prev: dict[str, str] = {}
    last = None
    for name, _output, _call, _nf, _fin in record.act_calls:
        if name not in prev and last is not None and last != name:
            prev[name] = last
        last = name
    return prev


class _Smoothed(Rule):
    """Shared state of the activation rules: a short per-target window averaged before judging."""

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        self.recent = Series(self.settings.smoothing)

    def smooth(self, target: str, step: int | None, value: float) -> float:
        return mean([v for _, v in self.recent.push(target, step, value)])

    def state_dict(self) -> dict:
        return {"recent": self.recent.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.recent.load_state_dict(state.get("recent", {}))


@register_rule
class ActDeadFeatures(_Smoothed):
    """``act.dead_features``: output features (last dimension) that are zero for every row of the step.

    Value: dead features / features of the module's output, averaged over ``rules.smoothing`` sampled
    steps; warning at 10 %, critical at 25 %. Needs ``rules.min_rows`` rows (batch × positions) in the step,
    or a unit is "dead" by chance. A module whose own weights are all zero (a zero-initialised layer, e.g.
    LoRA's B) is skipped while they are, and so is a linear layer whose input is all zeros (it outputs its
    bias; the dead units are upstream); when a parent returns the very same tensor as its child, only the
    child (the one that finished first) is judged. Only a module's main output (its first floating tensor) is
    judged: attention weights, position biases and caches returned beside it are not units.
    """

    code = "act.dead_features"
    order = 8  # before the per-parameter gradient rules: their zeros in this block follow from dead units
    explains = "dead units"
    thresholds: ClassVar[dict[str, Threshold]] = {"act.dead_features": Threshold(0.10, 0.25)}
    summary = "output features that are zero for every sample (dead ReLUs)"
    MIN_FEATURES = 4

    def check(self, record: StepRecord) -> None:
        step = record.step
        seen: set[tuple] = set()
        prev = producers(record)
        # a linear layer fed nothing but zeros outputs its bias: the units upstream are the dead ones
        zero_fed = {key[0] for key, rec in record.inputs.items() if rec.stats.zero_fraction >= 0.999}
        for name, recs in first_outputs(record.acts).items():
            best = None
            # Units are the module's main output (its first floating tensor); secondary outputs — attention
            # weights, a position bias (all zeros in T5's cross-attention by construction), caches — are not.
            primary = recs[0].output if recs else ""
            for rec in recs:
                if rec.output != primary:
                    continue
                st = rec.stats
                if not st.features or st.features < self.MIN_FEATURES or st.dead_features != st.dead_features:
                    continue
                if st.count / st.features < self.settings.min_rows:
                    continue
                sig = (st.count, st.features, st.dead_features, st.mean, st.std, st.min, st.max)
                if sig in seen:
                    continue
                seen.add(sig)
                frac = st.dead_features / st.features
                if best is None or frac > best[0]:
                    best = (frac, rec)
            if best is None or name in zero_fed or self._zero_weights(name, record):
                continue
            frac, rec = best
            value = self.smooth(name, step, frac)
            self.judge(
                name,
                value,
                step,
                message=lambda name=name, rec=rec, v=value: self._message(name, rec, v),
                hint=lambda name=name: self._hint(name, prev.get(name)),
            )

    def _zero_weights(self, module: str, record: StepRecord) -> bool:
        own = self.info.params_of(module)
        ups = [record.updates[p] for p in own if p in record.updates]
        return bool(ups) and len(ups) == len(own) and all(u.weight_norm == 0 for u in ups)

    def _message(self, name: str, rec: ActRecord, value: float) -> str:
        st = rec.stats
        rows = int(st.count / st.features)
        kind = self.info.activation(name)
        what = "dead ReLUs" if kind in ("relu", "leaky_relu", "relu6") else "dead units"
        where = f" (output `{rec.output}`)" if rec.output else ""
        return (
            f"{int(st.dead_features)} of {st.features} output features of `{name}`{where} are zero for every "
            f"one of the {rows} rows this step ({H.pct(value)} averaged over recent sampled steps): {what}"
        )

    def _hint(self, name: str, producer: str | None) -> str:
        kind = self.info.activation(name)
        feeder = producer if producer and self.info.is_linear(producer) else None
        return H.hint(self.code, module=feeder, info=self.info, lr=None, relu=kind == "relu")


@register_rule
class ActSaturation(_Smoothed):
    """``act.saturation``: pre-activations beyond ±``stats.saturation`` (3) where the activation is flat.

    Value: the share of a projection's output entries with |x| above the bound, for every linear layer
    whose output goes straight into a saturating activation module (tanh, sigmoid, GELU, SiLU, ...;
    ReLU-like ones die instead of saturating: act.dead_features). ``rules.saturation_modules`` may name
    other modules to check instead. Warning at 10 % (the playbook's "over 10 % is problematic"),
    critical at 25 %. Logits and residual streams are not checked: values beyond 3 are normal there.
    """

    code = "act.saturation"
    order = 21
    thresholds: ClassVar[dict[str, Threshold]] = {"act.saturation": Threshold(0.10, 0.25)}
    summary = "share of pre-activations beyond the saturation bound"

    def __init__(self, ctx: RuleContext):
        super().__init__(ctx)
        sel = self.settings.saturation_modules
        self._auto = sel == "auto"
        self._filter = None if self._auto else make_filter(patterns(sel))
        self.pairs: dict[str, str] = {}  # projection -> the activation it feeds

    def _learn_pairs(self, record: StepRecord) -> None:
        calls = record.act_calls
        for i in range(1, len(calls)):
            name = calls[i][0]
            if is_saturating(self.info.activation(name)):
                prev = calls[i - 1][0]
                if self.info.is_linear(prev):
                    self.pairs.setdefault(prev, name)

    def check(self, record: StepRecord) -> None:
        step = record.step
        outs = first_outputs(record.acts)
        if self._auto:
            self._learn_pairs(record)
            targets = list(self.pairs)
        else:
            targets = [n for n in outs if self._filter(n)]
        for name in targets:
            recs = outs.get(name)
            if not recs:
                continue
            st = recs[0].stats
            if st.saturation_fraction != st.saturation_fraction:
                continue
            value = self.smooth(name, step, st.saturation_fraction)
            act = self.pairs.get(name)
            self.judge(
                name,
                value,
                step,
                message=lambda name=name, v=value, st=st, act=act: self._message(name, v, st, act),
                hint=lambda name=name: H.hint(self.code, module=name, info=self.info, lr=None),
            )

    def _message(self, name: str, value: float, st, act: str | None) -> str:
        b = H.fmt(self.ctx.saturation)
        text = (
            f"{H.pct(value)} of the output of `{name}` is beyond ±{b} (recent average; mean {H.fmt(st.mean)}, "
            f"std {H.fmt(st.std)}, range [{H.fmt(st.min)}, {H.fmt(st.max)}])"
        )
        if act:
            kind = self.info.activation(act)
            text += f"; it feeds `{act}` ({kind}), which is nearly flat there, so those units pass almost no gradient"
        return text

    def state_dict(self) -> dict:
        return super().state_dict() | {"pairs": dict(self.pairs)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pairs = dict(state.get("pairs", {}))


@register_rule
class ActInputScale(_Smoothed):
    """``act.input_scale``: features entering a linear layer far outside [-3, 3] (the playbook's root cause).

    Value: the share of the layer's input entries with |x| above ``stats.saturation`` (3), averaged over
    ``rules.smoothing`` sampled steps. Warning at 10 %, critical at 30 %. Normalised inputs (LayerNorm
    outputs) have about 0.3 % there.
    """

    code = "act.input_scale"
    order = 22
    thresholds: ClassVar[dict[str, Threshold]] = {"act.input_scale": Threshold(0.10, 0.30)}
    summary = "share of a linear layer's input features outside [-3, 3]"

    def check(self, record: StepRecord) -> None:
        step = record.step
        prev = producers(record)
        for name, recs in first_outputs(record.inputs).items():
            st = recs[0].stats
            if st.saturation_fraction != st.saturation_fraction:
                continue
            value = self.smooth(name, step, st.saturation_fraction)
            self.judge(
                name,
                value,
                step,
                message=lambda name=name, v=value, st=st: self._message(name, v, st),
                hint=lambda name=name: self._hint(name, prev.get(name)),
            )

    def _message(self, name: str, value: float, st) -> str:
        b = H.fmt(self.ctx.saturation)
        text = (
            f"{H.pct(value)} of the features entering `{name}` are outside [-{b}, {b}] (recent average). "
            f"Input diagnostics: mean={H.fmt(st.mean)}, std={H.fmt(st.std)}, "
            f"range=[{H.fmt(st.min)}, {H.fmt(st.max)}]"
        )
        if st.features and st.dead_features == st.dead_features and st.dead_features > 0:
            text += f", dead features: {int(st.dead_features)}/{st.features} (zero in every row)"
        return text

    def _hint(self, name: str, producer: str | None) -> str:
        if producer and self.info.is_norm(producer):
            return H.hint(self.code, "after_norm", producer=producer, lr=None)
        return H.hint(self.code, module=name, info=self.info)
