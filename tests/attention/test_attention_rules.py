"""The attention rules driven directly on hand-built per-head statistics: no model, no capture.

The messages and hints are pinned word for word: the table-driven invariant rules must say exactly what the
hand-written ones said (the hints as rendered from stethoscope/rules/hints.yaml: one sentence, a final period).
"""

from __future__ import annotations

import json
import math

import pytest

from stethoscope.attention.rules import (
    INVARIANTS,
    RULES,
    CausalLeak,
    EntropyCollapse,
    ModuleAttention,
    PaddingLeak,
    RowSum,
    Sink,
)
from stethoscope.findings import FindingLog
from stethoscope.rules.base import RuleContext
from stethoscope.rules.thresholds import Threshold, threshold_keys
from tests._events import Events


def make(cls, *args, **kwargs):
    events = Events()
    return cls(RuleContext(findings=FindingLog(events)), *args, **kwargs), events.rows


def head(h: int, rows: int = 10, **values) -> dict:
    """One head's statistics, healthy unless ``values`` say otherwise."""
    return {"head": h, "rows": rows, "row_sum_error": 1e-7, "causal_leak": 0.0, "padding_mass": 0.0,
            "sink_share": 0.1, "sink_token": "first", "one_hot_fraction": 0.0, "collapse_rows_per_sequence": 8.0,
            "entropy_norm": 0.8} | values


def module(heads: list[dict], causal: bool = True, name: str = "h.0.attn", **kw) -> ModuleAttention:
    return ModuleAttention(name=name, heads=heads, causal=causal, method="recompute", **kw)


ROW_SUM_HINT = (
    "A softmax row must sum to 1. Usual causes: the mask applied after the softmax (multiplying or filling "
    "probabilities instead of adding -inf to the scores), the softmax taken over the wrong axis (dim=-2 instead "
    "of -1), or a renormalisation/dropout applied before the weights are read."
)
CAUSAL_HINT = (
    "The causal mask is missing or misaligned: fill the scores above the diagonal with -inf before the softmax "
    "(masked_fill(~tril, -inf)), or pass is_causal=True / a causal 4-D mask to the attention kernel. A model "
    "that sees the future trains to a suspiciously low loss and fails at generation. "
    "stethoscope.attention.check_causality(model, input_ids) confirms it from the outputs."
)
PADDING_HINT = (
    "The padding mask does not reach this attention: pass attention_mask to the model (not only to the "
    "tokenizer), check it is 1 for tokens and 0 for padding, and that a custom attention adds it to the scores "
    "before the softmax. Padding that leaks makes outputs depend on the batch's padding length."
)


def test_the_rules_and_their_registered_thresholds():
    assert [c.__name__ for c in RULES] == ["RowSum", "CausalLeak", "PaddingLeak", "EntropyCollapse", "Sink",
                                           "LogitGrowth"]
    assert [c.code for c in RULES] == [
        "attn.row_sum", "attn.causal_leak", "attn.padding_leak", "attn.entropy_collapse", "attn.sink",
        "attn.logit_growth"]
    assert [inv.code for inv in INVARIANTS] == ["attn.row_sum", "attn.causal_leak", "attn.padding_leak"]
    assert RowSum.thresholds == {"attn.row_sum": Threshold(1e-3, 1e-2)}
    assert CausalLeak.thresholds == {"attn.causal_leak": Threshold(1e-3, 1e-2)}
    assert PaddingLeak.thresholds == {"attn.padding_leak": Threshold(1e-3, 1e-2)}
    assert EntropyCollapse.thresholds == {"attn.entropy_collapse": Threshold(0.5, None)}
    keys = threshold_keys()
    assert keys["attn.causal_leak"].doc == "a causal attention puts probability on future keys"
    assert keys["attn.padding_leak"].doc == "attention probability on padding positions of the input"
    assert keys["attn.row_sum"].doc == "attention probability rows sum to 1 (within attention.row_sum_tol)"
    # the constructors the attention extension calls
    assert make(RowSum, 1e-4)[0].threshold("x") == Threshold(1e-4, 1e-2)
    assert make(RowSum, 5e-3)[0].threshold("x") == Threshold(5e-3, 5e-2)
    assert make(Sink, 0.3)[0].threshold("x") == Threshold(0.3, None)


def test_row_sum_names_the_worst_head_and_closes_with_hysteresis():
    rule, events = make(RowSum)
    rule.check_modules(3, [module([head(0), head(1, row_sum_error=0.02), head(2, row_sum_error=0.004),
                                   head(3, rows=0, row_sum_error=0.5)])])  # a head without rows says nothing
    [e] = events
    assert (e["event"], e["code"], e["target"], e["severity"], e["value"], e["threshold"], e["step"]) == (
        "open", "attn.row_sum", "h.0.attn", "critical", 0.02, 1e-2, 3)
    assert e["message"] == (
        "attention rows of h.0.attn do not sum to 1: |row sum - 1| reaches 0.02 in head 1 (heads 1, 2; "
        "probabilities from recompute)"
    )
    assert e["hint"] == ROW_SUM_HINT
    assert e["data"] == {"heads": [1, 2], "worst_head": 1, "method": "recompute"}
    rule.check_modules(4, [module([head(0, row_sum_error=9e-4)])])  # under 1e-3, not under 0.8e-3: still open
    assert len(events) == 1
    rule.check_modules(5, [module([head(0)])])
    assert [(e["event"], e["step"]) for e in events[1:]] == [("close", 5)]


def test_causal_leak_only_on_causal_modules():
    rule, events = make(CausalLeak)
    leaking = [head(0, causal_leak=0.005), head(1, causal_leak=0.25)]
    rule.check_modules(0, [module(leaking, causal=False, name="enc")])  # an encoder sees the future by design
    assert events == []
    rule.check_modules(1, [module(leaking)])
    [e] = events
    assert (e["severity"], e["value"], e["threshold"]) == ("critical", 0.25, 1e-2)
    assert e["message"] == (
        "h.0.attn is causal but its queries attend to future positions: up to 25.0% of a row's attention is on "
        "later tokens (head 1; heads 0, 1)"
    )
    assert e["hint"] == CAUSAL_HINT


def test_padding_leak_lists_at_most_twelve_heads():
    rule, events = make(PaddingLeak)
    rule.check_modules(0, [module([head(h, padding_mass=0.002 + h * 1e-4) for h in range(14)], causal=False)])
    [e] = events
    assert (e["severity"], e["threshold"]) == ("warning", 1e-3) and e["value"] == pytest.approx(0.0033)
    assert e["message"] == (
        "h.0.attn attends to padding: up to 0.3% of a row's attention is on positions the input's attention_mask "
        "marks as padding (head 13; heads 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 2 more)"
    )
    assert e["hint"] == PADDING_HINT
    assert e["data"]["heads"] == list(range(14))


@pytest.mark.parametrize("cls", [RowSum, CausalLeak, PaddingLeak, EntropyCollapse, Sink])
def test_healthy_heads_open_nothing(cls):
    rule, events = make(cls)
    for step in range(3):
        rule.check_modules(step, [module([head(h) for h in range(4)]), module([head(0)], name="h.1.attn")])
    rule.check_modules(3, [module([head(0, rows=0, row_sum_error=math.nan, causal_leak=math.nan,
                                        padding_mass=math.nan, sink_share=math.nan, one_hot_fraction=math.nan)])])
    assert events == []


def test_entropy_collapse_needs_half_the_heads():
    rule, events = make(EntropyCollapse)
    one = [head(0, one_hot_fraction=1.0, entropy_norm=0.01), head(1), head(2), head(3)]
    rule.check_modules(0, [module(one)])  # one positional head is normal
    assert events == []
    two = [head(0, one_hot_fraction=1.0, entropy_norm=0.01), head(1, one_hot_fraction=0.96), head(2), head(3)]
    rule.check_modules(1, [module(two)])
    [e] = events
    assert (e["severity"], e["value"], e["threshold"]) == ("warning", 0.5, 0.5)
    assert e["message"] == (
        "attention entropy collapsed in h.0.attn: 2 of 4 heads (heads 0, 1) put >= 99% of every row's attention "
        "on a single key; lowest normalised entropy 0.010 in head 0"
    )
    assert e["data"] == {"heads": [0, 1], "collapsed_fraction": 0.5, "method": "recompute"}


def test_sink_is_info_and_names_the_token():
    rule, events = make(Sink, 0.5, token_text=lambda i: "[CLS]")
    heads = [head(0, sink_share=0.8), head(1, sink_share=0.6), head(2, sink_share=0.2)]
    rule.check_modules(0, [module(heads, first_token=101)])
    [e] = events
    assert (e["severity"], e["value"], e["threshold"]) == ("info", 0.8, 0.5)
    assert e["message"].startswith(
        "attention sink in h.0.attn: heads 0, 1 put 60%–80% of their attention on the first token ('[CLS]', id 101)")
    assert e["data"] == {"heads": [0, 1], "shares": {"0": 0.8, "1": 0.6}, "token": "first", "token_id": 101,
                         "method": "recompute"}
    rule.check_modules(1, [module([head(0, sink_share=0.2)])])
    assert [e["event"] for e in events] == ["open", "close"]


def test_state_round_trip_of_the_finding_log_keeps_an_invariant_open():
    first, _ = make(CausalLeak)
    first.check_modules(0, [module([head(0, causal_leak=0.3)])])
    second, events = make(CausalLeak)
    second.ctx.findings.load_state_dict(json.loads(json.dumps(first.ctx.findings.state_dict())))
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    second.check_modules(1, [module([head(0, causal_leak=0.3)])])  # the same: no new event
    assert events == []
    second.check_modules(2, [module([head(0)])])
    assert [(e["event"], e["code"], e["step"]) for e in events] == [("close", "attn.causal_leak", 2)]
