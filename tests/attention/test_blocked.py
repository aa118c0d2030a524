"""The blocked (online-softmax) statistics against the full-matrix ones: every column, every mask kind.

The full-matrix path (:func:`checks.head_statistics` over :func:`checks.recompute`) is itself tested against a
naive per-row reference in test_statistics.py; here the blocked path must give the same row with tiles far
smaller than the sequence, so every recurrence (rescaling, first/last key, argmax across tiles) is exercised.
"""

from __future__ import annotations

import math

import pytest
import torch

from stethoscope.attention import capture as cap
from stethoscope.attention.blocked import blocked_statistics, max_logits
from stethoscope.attention.capture import AttentionCall
from stethoscope.attention.checks import (
    COLUMNS,
    TAIL,
    WIDTH,
    allowed_keys,
    head_statistics,
    masked_scores,
    scores,
    summarize,
)
from tests.attention.conftest import gpt2, llama_gqa, padded_batch

TILES = [(3, 5), (4, 16), (0, 0), (1, 1)]  # (block_queries, block_keys); 0 = whole length


def reference_max_logit(call: AttentionCall, padding: torch.Tensor | None) -> torch.Tensor:
    """(nh,) the largest masked score over valid rows, from the full (B, nh, Tq, Tk) matrix."""
    s = masked_scores(call, scores(call))  # (B, nh, Tq, Tk)
    b, h, tq, tk = s.shape
    allowed = allowed_keys(call, tq, tk, s.device)
    if padding is not None:
        allowed = allowed & ~padding[:, None, None, :]
    valid = allowed.any(-1).expand(b, h, tq)
    if padding is not None and tq == tk:
        valid = valid & ~padding[:, None, :]
    out = torch.where(valid, s.amax(-1), float("-inf")).amax((0, 2))
    return torch.where(out == float("-inf"), float("nan"), out)


def assert_same(blocked: torch.Tensor, full: torch.Tensor, heads: int, call: AttentionCall, padding, tol=2e-5):
    assert blocked.shape == full.shape == (heads * WIDTH + TAIL,)
    b = blocked[: heads * WIDTH].reshape(heads, WIDTH)
    f = full[: heads * WIDTH].reshape(heads, WIDTH)
    for c, name in enumerate(COLUMNS):
        if name == "max_logit":
            want = reference_max_logit(call, padding)
            torch.testing.assert_close(b[:, c], want, rtol=1e-6, atol=1e-5, equal_nan=True)
            continue
        scale = max(1.0, float(f[:, c].abs().max()))  # sums over many rows: relative to their size
        err = float((b[:, c] - f[:, c]).abs().max())
        assert err <= tol * scale, (name, b[:, c], f[:, c])
    assert torch.equal(blocked[heads * WIDTH :], full[heads * WIDTH :]), "sink token ids"


def random_call(b=3, h=4, nkv=2, t=13, hs=8, causal=True, mask="additive", softcap=None, bias=False, seed=0,
                spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, hs, generator=g) * spread
    k = torch.randn(b, nkv, t, hs, generator=g) * spread
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, 9:] = True
    pad[2, 4:] = True
    keep = ~pad[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        keep = keep & torch.ones(t, t, dtype=torch.bool).tril()
    if mask == "additive":
        m = torch.zeros(b, 1, t, t).masked_fill(~keep, torch.finfo(torch.float32).min)
    elif mask == "bool":
        m = keep.expand(b, 1, t, t).clone()
    elif mask == "2d":
        m = (~pad).long()
    else:  # None: SDPA's is_causal
        m, pad = None, None
    pb = torch.randn(1, h, t, t, generator=g) if bias else None
    call = AttentionCall(name="x", module=None, query=q, key=k, mask=m, scaling=hs**-0.5, causal=causal,
                         implicit_causal=causal and m is None, softcap=softcap, position_bias=pb,
                         implementation="sdpa")
    ids = torch.randint(1, 100, (b, t), generator=g)
    return call, pad, ids


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize(
    "kind",
    [
        dict(mask="additive"),
        dict(mask="bool"),
        dict(mask=None),
        dict(mask="2d", causal=False),
        dict(mask="additive", causal=False, nkv=4),
        dict(mask="additive", softcap=5.0, bias=True),
        dict(mask="additive", spread=12.0),  # logits of several hundred: near one-hot rows, sinks, rescaling
    ],
    ids=["additive", "bool", "is_causal", "2d-bidirectional", "bidirectional-mha", "softcap-bias", "one-hot"],
)
def test_blocked_equals_full_matrix(kind, tiles):
    call, pad, ids = random_call(**kind)
    full = head_statistics(call, None, pad, ids)
    blocked = blocked_statistics(call, pad, ids, *tiles)
    assert_same(blocked, full, call.query.shape[1], call, pad)


def test_one_hot_rows_and_sinks_are_exercised():
    """The steep case really has near one-hot rows off and on the sink, so the comparison above can fail."""
    call, pad, ids = random_call(mask="additive", spread=12.0)
    heads = summarize(blocked_statistics(call, pad, ids, 3, 5).numpy(), 4)
    assert sum(h["one_hot_rows"] for h in heads) > 10
    assert all(h["max_logit"] > 50 for h in heads)


def test_nonfinite_scores_count_as_nonfinite_rows_in_both_paths():
    call, pad, ids = random_call(mask="additive")
    call.query = call.query.clone()
    call.query[0, 1, 6, 0] = float("nan")
    full = summarize(head_statistics(call, None, pad, ids).numpy(), 4)
    blocked = summarize(blocked_statistics(call, pad, ids, 4, 4).numpy(), 4)
    assert full[1]["nonfinite_rows"] == blocked[1]["nonfinite_rows"] == 1
    assert [h["rows"] for h in full] == [h["rows"] for h in blocked]


def _captured(model, ids, mask):
    calls = []
    names = {m: n for n, m in model.named_modules()}
    capture = cap.HFCapture(model, names)
    capture.listeners.append(calls.append)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        capture.remove()
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_blocked_equals_full_on_real_models(family, dtype):
    """GPT-2 (learned positions) and Llama (rotary, 4 query heads on 2 key/value heads), right padding, SDPA."""
    model = (gpt2 if family == "gpt2" else llama_gqa)(attn_implementation="sdpa").to(dtype).eval()
    ids, mask = padded_batch()
    calls = _captured(model, ids, mask)
    assert len(calls) == 2
    pad = mask == 0
    if family == "llama":
        assert calls[0].key.shape[1] == 2 and calls[0].query.shape[1] == 4  # GQA reaches the statistics
    for call in calls:
        assert call.query.dtype == dtype
        full = head_statistics(call, None, pad, ids)
        for tiles in ((5, 3), (0, 0)):
            assert_same(blocked_statistics(call, pad, ids, *tiles), full, call.query.shape[1], call, pad)


def test_max_logits_for_returned_weights():
    call, pad, _ = random_call(mask="bool")
    torch.testing.assert_close(max_logits(call, pad, 4, 4), reference_max_logit(call, pad), equal_nan=True)


def test_no_valid_row_gives_nan_max_logit():
    call, pad, ids = random_call(mask="additive")
    call.mask = torch.full_like(call.mask, torch.finfo(torch.float32).min)  # every key blocked
    heads = summarize(blocked_statistics(call, pad, ids, 4, 4).numpy(), 4)
    assert all(h["rows"] == 0 and math.isnan(h["max_logit"]) for h in heads)


def test_positional_tiles_are_shared_across_calls_and_dropped_when_the_monitor_detaches(tmp_path):
    # SDPA's is_causal with no mask tensor: every layer's tiles follow from positions alone and are computed
    # once; a second call (another layer) reuses them with the same result, and closing the monitor drops them
    from stethoscope.attention import blocked as blocked_mod

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    call = AttentionCall(name="x", module=None, query=q, key=k, scaling=0.5, causal=True, implicit_causal=True,
                         implementation="sdpa")
    blocked_mod.release_cached_tiles()
    first = blocked_statistics(call, None, None, 4, 4)
    cached = blocked_mod._positional_tile.cache_info().currsize
    assert cached > 0
    assert torch.equal(blocked_statistics(call, None, None, 4, 4), first)
    assert blocked_mod._positional_tile.cache_info().currsize == cached  # reused, not recomputed
    assert_same(first, head_statistics(call), 3, call, None)

    import stethoscope as st

    model = gpt2()
    blocked_mod.release_cached_tiles()
    with st.Monitor(model, run_dir=tmp_path / "run", schedule=lambda s: True) as mon:
        with mon.step(0):
            model(input_ids=torch.randint(0, 50, (2, 8), generator=g))
        assert blocked_mod._positional_tile.cache_info().currsize > 0  # the capture used them
    assert blocked_mod._positional_tile.cache_info().currsize == 0
