"""The per-head statistics against a naive per-row reference, and the recomputation against eager attention."""

from __future__ import annotations

import math

import torch

from stethoscope.attention.capture import AttentionCall
from stethoscope.attention.checks import TAIL, WIDTH, head_statistics, merge_rows, recompute, summarize


def naive(p, allowed, causal, pad):
    """Loops over rows: what the documented definitions say."""
    b, h, tq, tk = p.shape
    out = []
    for head in range(h):
        ent, sinks, errs, leaks, pads, rows = [], [], [], [], [], 0
        for bi in range(b):
            for i in range(tq):
                keys = [j for j in range(tk) if allowed[bi, i, j] and not pad[bi, j] and not (causal and j > i)]
                if not keys or pad[bi, i]:
                    continue
                rows += 1
                row = p[bi, head, i]
                ent.append(-sum(float(x) * math.log(float(x)) for x in row if x > 0))
                errs.append(abs(float(row.sum()) - 1))
                leaks.append(float(row[i + 1 :].sum()) if causal else 0.0)
                pads.append(float(row[pad[bi]].sum()))
                if len(keys) >= 4:
                    sinks.append(float(row[keys[0]]))
        out.append({"rows": rows, "entropy": sum(ent) / rows, "row_sum_error": max(errs), "causal_leak": max(leaks),
                    "padding_mass": max(pads), "sink_first": sum(sinks) / len(sinks)})
    return out


def test_statistics_match_a_naive_reference():
    g = torch.Generator().manual_seed(0)
    b, h, t = 3, 2, 7
    scores = torch.randn(b, h, t, t, generator=g) * 2
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, 5:] = True
    allowed = ~pad[:, None, :].expand(b, t, t)
    p = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1)
    p[0, 1, 3, 6] += 0.01  # a broken row: sum 1.01 and a leak into the future
    mask = torch.zeros(b, 1, t, t).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    call = AttentionCall(name="x", module=None, mask=mask, causal=True)
    row = head_statistics(call, p, padding=pad)
    assert row.shape == (h * WIDTH + TAIL,)
    got = summarize(row.numpy(), h)
    want = naive(p, allowed, True, pad)
    for g_, w in zip(got, want, strict=True):
        assert g_["rows"] == w["rows"]
        for key in ("entropy", "row_sum_error", "causal_leak", "padding_mass", "sink_first"):
            assert math.isclose(g_[key], w[key], rel_tol=1e-4, abs_tol=1e-6), (key, g_[key], w[key])
    assert got[1]["row_sum_error"] > 0.009 and got[0]["row_sum_error"] < 1e-5
    # two calls of one module: sums add, maxima take the max
    both = summarize(merge_rows([row.numpy(), row.numpy()], h), h)
    assert both[1]["rows"] == 2 * got[1]["rows"] and both[1]["row_sum_error"] == got[1]["row_sum_error"]


def test_recompute_matches_eager_attention_with_gqa_and_padding():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 5, 8, generator=g)
    v = torch.randn(2, 2, 5, 8, generator=g)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    keep = causal[None, None].expand(2, 1, 5, 5).clone()
    keep[1, :, :, :2] = False  # left padding in the second sequence
    keep[1, :, :2, 0] = True  # (rows with nothing to see keep one key, as HF masks do)
    mask = torch.zeros(2, 1, 5, 5).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    _, weights = eager_attention_forward(module, q, k, v, mask, scaling=8**-0.5)
    call = AttentionCall(name="x", module=module, query=q, key=k, value=v, mask=mask, scaling=8**-0.5, causal=True)
    torch.testing.assert_close(recompute(call), weights, rtol=0, atol=1e-6)
    # SDPA's implicit causal mask (no mask tensor, is_causal) gives the same probabilities as an explicit one
    implicit = AttentionCall(name="x", module=module, query=q, key=k, mask=None, scaling=8**-0.5, causal=True,
                             implicit_causal=True)
    explicit = AttentionCall(name="x", module=module, query=q, key=k, mask=causal[None, None], scaling=8**-0.5)
    torch.testing.assert_close(recompute(implicit), recompute(explicit), rtol=0, atol=0)
