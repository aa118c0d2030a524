"""The attention invariants as rules: one finding per attention module, the offending heads in its data.

They use the ordinary :class:`~stethoscope.rules.Rule` machinery (thresholds with per-pattern overrides,
open / update / close with hysteresis, at most ``rules.max_open`` open per code) but are driven by the
attention extension, which hands them the step's per-head statistics (see :mod:`stethoscope.attention.checks`)
rather than a :class:`~stethoscope.record.StepRecord`. ``rules.enabled`` / ``rules.disabled`` apply to them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stethoscope.rules import hints as H
from stethoscope.rules.base import Rule, RuleContext
from stethoscope.rules.thresholds import Threshold, register_threshold

COLLAPSED_HEAD = 0.95  # a head is collapsed when this share of its rows (2+ keys, off the sink) is near one-hot
MIN_COLLAPSE_ROWS = 4  # fewer eligible rows per sequence (very short sequences) say nothing about a collapse


@dataclass
class ModuleAttention:
    """One attention module's statistics for a step (all its calls merged)."""

    name: str
    heads: list[dict]
    causal: bool
    method: str
    first_token: int | None = None
    last_token: int | None = None
    extra: dict = field(default_factory=dict)


def _heads(items: list[int]) -> str:
    return ", ".join(str(h) for h in items[:12]) + (f" and {len(items) - 12} more" if len(items) > 12 else "")


def _finite(v: Any) -> bool:
    return isinstance(v, float | int) and not math.isnan(v)


class AttentionRule(Rule):
    """Base of the attention rules: ``check_modules`` replaces ``check``."""

    sampled_only: ClassVar[bool] = True
    order: ClassVar[int] = 40

    def check(self, record: Any) -> None:  # driven through check_modules, not through StepRecords
        return None

    def check_modules(self, step: int | None, modules: list[ModuleAttention]) -> None:
        for m in modules:
            self.check_module(step, m)
        self.settle(step)

    def check_module(self, step: int | None, m: ModuleAttention) -> None:
        raise NotImplementedError

    def worst_heads(self, m: ModuleAttention, key: str) -> tuple[float, int, list[int]] | None:
        """(worst value, its head, the heads at a threshold level) of the per-head statistic ``key``, over the
        heads that had rows to check; None when none had."""
        values = [(h[key], h["head"]) for h in m.heads if _finite(h[key]) and h["rows"]]
        if not values:
            return None
        worst, head = max(values)
        th = self.threshold(m.name)
        return worst, head, [h for v, h in values if th.severity(v)]


@dataclass(frozen=True)
class Invariant:
    """One per-head invariant of attention probabilities, as a row of :data:`INVARIANTS`.

    The rule it drives takes, per module, the worst head of the per-head statistic ``key`` (see
    :func:`stethoscope.attention.checks.summarize`) over the heads that had rows to check, and judges it
    against ``threshold``; ``data`` lists the heads at a threshold level.

    Attributes:
        code: the finding code (and the threshold key).
        key: the per-head statistic judged.
        summary: one line saying what it watches.
        threshold: the default levels.
        message: a :meth:`str.format` template with ``name`` (the module), ``worst`` (the worst value),
            ``head`` (its head), ``heads`` (the heads at a level, listed) and ``method`` (how the
            probabilities were obtained).
        applies: which modules it judges (all of them by default).
    """

    code: str
    key: str
    summary: str
    threshold: Threshold
    message: str
    applies: Callable[[ModuleAttention], bool] = lambda m: True


INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        code="attn.row_sum",
        key="row_sum_error",
        summary="attention probability rows sum to 1 (within attention.row_sum_tol)",
        threshold=Threshold(1e-3, 1e-2),
        message=(
            "attention rows of {name} do not sum to 1: |row sum - 1| reaches {worst:.3g} in head {head}"
            " (heads {heads}; probabilities from {method})"
        ),
    ),
    Invariant(
        code="attn.causal_leak",
        key="causal_leak",
        summary="a causal attention puts probability on future keys",
        threshold=Threshold(1e-3, 1e-2),
        message=(
            "{name} is causal but its queries attend to future positions: up to {worst:.1%} of a row's "
            "attention is on later tokens (head {head}; heads {heads})"
        ),
        applies=lambda m: m.causal,
    ),
    Invariant(
        code="attn.padding_leak",
        key="padding_mass",
        summary="attention probability on padding positions of the input",
        threshold=Threshold(1e-3, 1e-2),
        message=(
            "{name} attends to padding: up to {worst:.1%} of a row's attention is on positions the input's "
            "attention_mask marks as padding (head {head}; heads {heads})"
        ),
    ),
)
_INVARIANT = {inv.code: inv for inv in INVARIANTS}


class InvariantRule(AttentionRule):
    """A rule driven by one :class:`Invariant`: a subclass names its row, which sets ``code``, ``summary``
    and ``thresholds``."""

    invariant: ClassVar[Invariant]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inv = cls.__dict__.get("invariant")
        if inv is not None:
            cls.code = inv.code
            cls.summary = inv.summary
            cls.thresholds = {inv.code: inv.threshold}

    def check_module(self, step: int | None, m: ModuleAttention) -> None:
        inv = self.invariant
        if not inv.applies(m):
            return
        found = self.worst_heads(m, inv.key)
        if found is None:
            return
        worst, head, bad = found
        self.judge(
            m.name, worst, step,
            message=lambda: inv.message.format(
                name=m.name, worst=worst, head=head, heads=_heads(bad), method=m.method
            ),
            hint=lambda: H.hint(inv.code),
            data={"heads": bad, "worst_head": head, "method": m.method},
        )


class RowSum(InvariantRule):
    invariant = _INVARIANT["attn.row_sum"]

    def __init__(self, ctx: RuleContext, tol: float = 1e-3):
        super().__init__(ctx)
        self.thresholds = {self.code: Threshold(tol, max(10 * tol, 1e-2))}


class CausalLeak(InvariantRule):
    invariant = _INVARIANT["attn.causal_leak"]


class PaddingLeak(InvariantRule):
    invariant = _INVARIANT["attn.padding_leak"]


class EntropyCollapse(AttentionRule):
    code = "attn.entropy_collapse"
    summary = "at least half of a layer's heads put (almost) all attention of every row on a single key"
    thresholds: ClassVar[dict[str, Threshold]] = {"attn.entropy_collapse": Threshold(0.5, None)}

    def check_module(self, step, m):
        eligible = [h for h in m.heads
                    if h["collapse_rows_per_sequence"] >= MIN_COLLAPSE_ROWS and _finite(h["one_hot_fraction"])]
        if not eligible:
            return  # too short a sequence, or no head with 2+ visible keys per row
        collapsed = [h["head"] for h in eligible if h["one_hot_fraction"] >= COLLAPSED_HEAD]
        share = len(collapsed) / len(m.heads)
        lowest = min(eligible, key=lambda h: h["entropy_norm"] if _finite(h["entropy_norm"]) else 1.0)
        self.judge(
            m.name, share, step,
            message=lambda: (
                f"attention entropy collapsed in {m.name}: {len(collapsed)} of {len(m.heads)} heads (heads "
                f"{_heads(collapsed)}) put >= {0.99:.0%} of every row's attention on a single key; lowest "
                f"normalised entropy {lowest['entropy_norm']:.3f} in head {lowest['head']}"
            ),
            hint=lambda: H.hint(self.code),
            data={"heads": collapsed, "collapsed_fraction": share, "method": m.method},
        )


class Sink(AttentionRule):
    code = "attn.sink"
    summary = "heads putting most of their attention on the first token or a special token (info)"
    thresholds: ClassVar[dict[str, Threshold]] = {"attn.sink": Threshold(0.5, None)}

    def __init__(self, ctx: RuleContext, share: float = 0.5, token_text: Any = None):
        super().__init__(ctx)
        self.thresholds = {self.code: Threshold(share, None)}
        self.token_text = token_text  # id -> text, when a tokenizer is known

    def _token(self, m: ModuleAttention, which: str) -> tuple[str, int | None]:
        tid = m.first_token if which == "first" else m.last_token
        where = "the first token" if which == "first" else "the last token"
        if tid is None:
            return where, None
        text = None
        if self.token_text is not None:
            try:
                text = self.token_text(tid)
            except Exception:
                text = None
        return (f"{where} ({text!r}, id {tid})" if text else f"{where} (id {tid})"), tid

    def check_module(self, step, m):
        heads = [h for h in m.heads if _finite(h["sink_share"])]
        if not heads:
            return
        level = self.threshold(m.name).warning
        sinks = [h for h in heads if level is not None and h["sink_share"] >= level]
        top = max(heads, key=lambda h: h["sink_share"])
        if not sinks:
            self.judge(m.name, top["sink_share"], step, message="", hint="")  # closes a finding that cleared
            return
        which = max({"first", "last"}, key=lambda w: sum(1 for h in sinks if h["sink_token"] == w))
        token, tid = self._token(m, which)
        per_head = {str(h["head"]): round(h["sink_share"], 4) for h in sinks}  # JSON keys are strings
        self.judge(
            m.name, top["sink_share"], step,
            message=lambda: (
                f"attention sink in {m.name}: heads {_heads(list(per_head))} put {min(per_head.values()):.0%}–"
                f"{max(per_head.values()):.0%} of their attention on {token}. This is a known, usually benign "
                "pattern: heads with nothing to attend to park their probability on a fixed token"
            ),
            hint=lambda: H.hint(self.code),
            data={"heads": [int(h) for h in per_head], "shares": per_head, "token": which, "token_id": tid, "method": m.method},
            severity="info",
        )


class LogitGrowth(AttentionRule):
    """A head's largest pre-softmax logit growing without bound: the attention-logit instability.

    Wortsman et al. (2023) and Dehghani et al. (2023) see the max attention logit of some heads grow by orders
    of magnitude before the loss diverges; the softmax of those heads is then one-hot and their gradient
    vanishes. Judged per module over each head's ``max_logit`` (masked ``q·k·scaling``): a finding opens when a
    head is at or above the warning level *and* its max logit grew by ``growth`` over the last ``window``
    sampled steps (a high but steady logit, e.g. a sharp positional head, is not a growth). It stays open while
    the head stays above the level, and closes below it.
    """

    code = "attn.logit_growth"
    summary = "a head's largest pre-softmax attention logit grows without bound (attention-logit instability)"
    thresholds: ClassVar[dict[str, Threshold]] = {"attn.logit_growth": Threshold(50.0, 1000.0)}

    def __init__(self, ctx: RuleContext, window: int = 8, growth: float = 2.0):
        super().__init__(ctx)
        self.window = window
        self.growth = growth
        self._history: dict[tuple[str, int], list[float]] = {}  # (module, head) -> last `window` max logits

    def growing(self, values: list[float]) -> bool:
        """The last value is ``growth`` times the window's smallest, and the window's later half is above its
        earlier half (a rise, not one outlier)."""
        if len(values) < max(3, self.window // 2):
            return False
        half = len(values) // 2
        early = sorted(values[:half])[(half - 1) // 2]  # lower medians: robust to one spike
        late = sorted(values[half:])[(len(values) - half - 1) // 2]
        low = min(values)
        return values[-1] >= self.growth * max(low, 1e-6) and late > early

    def check_module(self, step, m):
        level = self.threshold(m.name).shown
        rising, high = [], []
        for h in m.heads:
            v = h.get("max_logit")
            if not _finite(v):
                continue
            hist = self._history.setdefault((m.name, h["head"]), [])
            hist.append(float(v))
            del hist[: -self.window]
            if level is not None and v >= level:
                high.append((float(v), h["head"]))
                if self.growing(hist):
                    rising.append(h["head"])
        if not high:
            values = [h["max_logit"] for h in m.heads if _finite(h.get("max_logit"))]
            if values:
                self.judge(m.name, max(values), step, message="", hint="")  # closes a finding that cleared
            return
        if not rising and not self.is_open(m.name):
            return  # high but steady: a sharp head, not a growth
        worst, head = max(high)
        hist = self._history[(m.name, head)]
        first, span = hist[0], len(hist) - 1
        heads = sorted(set(rising) | {hh for _, hh in high}) if self.is_open(m.name) else rising
        self.judge(
            m.name, worst, step,
            message=lambda: (
                f"attention logits of {m.name} grow without bound: head {head}'s largest pre-softmax logit is "
                f"{worst:.4g} (it was {first:.4g} {span} sampled steps earlier); heads {_heads(heads)} "
                "are at a level where the softmax is one-hot. Wortsman et al. (2023) see this before the loss "
                "diverges"
            ),
            hint=lambda: H.hint(self.code),
            data={"heads": heads, "worst_head": head, "max_logit": worst, "method": m.method},
        )

    def state_dict(self) -> dict:
        return {"history": [[name, head, vals] for (name, head), vals in self._history.items()]}

    def load_state_dict(self, state: dict) -> None:
        self._history = {(name, int(head)): list(vals) for name, head, vals in state.get("history", [])}


RULES = (RowSum, CausalLeak, PaddingLeak, EntropyCollapse, Sink, LogitGrowth)

for _cls in RULES:  # config validation and `registered thresholds` know the keys without a monitor
    for _key, _th in _cls.thresholds.items():
        register_threshold(_key, _th, _cls.summary)
