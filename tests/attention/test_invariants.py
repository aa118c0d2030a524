"""Deliberately broken attentions are caught by the matching finding (and nothing else of attn.*)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stethoscope as st
from stethoscope.attention import check_causality

from .conftest import attn_findings, bert, describe, gpt2, padded_batch, train

BUGS = ("mask_after_softmax", "no_causal_mask", "softmax_wrong_axis")
EXPECTED = {"mask_after_softmax": "attn.row_sum", "no_causal_mask": "attn.causal_leak",
            "softmax_wrong_axis": "attn.row_sum"}


class CausalAttention(nn.Module):
    """A hand-written causal self-attention with an optional bug; keeps its weights like the demo's."""

    def __init__(self, dim: int = 16, heads: int = 2, bug: str | None = None, returns: bool = False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads, self.bug, self.returns = heads, bug, returns
        self.keep_attn, self.last_attn = False, None
        if returns:  # the other protocol: (output, weights), named by attention.modules
            del self.keep_attn, self.last_attn

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        s = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads)  # (B, nh, T, T)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        if self.bug == "mask_after_softmax":
            w = F.softmax(s, dim=-1).masked_fill(future, 0.0)  # rows no longer sum to 1
        elif self.bug == "no_causal_mask":
            w = F.softmax(s, dim=-1)
        elif self.bug == "softmax_wrong_axis":
            w = F.softmax(s.masked_fill(future, float("-inf")), dim=-2)
        else:
            w = F.softmax(s.masked_fill(future, float("-inf")), dim=-1)
        if getattr(self, "keep_attn", False):
            self.last_attn = w.detach()
        y = self.proj((w @ v).transpose(1, 2).reshape(b, t, c))
        return (y, w) if self.returns else y


class TinyLM(nn.Module):
    def __init__(self, bug=None, returns=False):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.attn = CausalAttention(bug=bug, returns=returns)
        self.head = nn.Linear(16, 64)

    def forward(self, ids):
        y = self.attn(self.emb(ids))
        return self.head(y[0] if isinstance(y, tuple) else y)


IDS = torch.randint(0, 64, (2, 4, 10), generator=torch.Generator().manual_seed(0))


def lm(model, step):
    logits = model(IDS[step])
    return F.cross_entropy(logits[:, :-1].reshape(-1, 64), IDS[step][:, 1:].reshape(-1))


@pytest.mark.parametrize("returns", [False, True], ids=["keeps-weights", "returns-weights"])
@pytest.mark.parametrize("bug", [None, *BUGS])
def test_hand_written_attention_bugs(tmp_path, bug, returns):
    torch.manual_seed(0)
    config = {"attention": {"modules": "attn"}} if returns else None
    run = train(TinyLM(bug, returns), 2, lm, tmp_path / "r", config=config)
    found = attn_findings(run)
    assert set(run.metrics_of("attn")["method"]) == {"module"}
    if bug is None:
        assert not found, describe(found)
        return
    codes = {f.code for f in found}
    assert EXPECTED[bug] in codes, describe(run.findings)
    assert codes <= {"attn.row_sum", "attn.causal_leak"}, describe(found)
    f = next(f for f in found if f.code == EXPECTED[bug])
    assert f.target == "attn" and f.data["heads"] and "head" in f.message


def test_perturbation_check_tells_a_causal_model_from_a_leaking_one():
    torch.manual_seed(0)
    ids = IDS[0]
    assert check_causality(TinyLM(), ids).passed
    bad = check_causality(TinyLM("no_causal_mask"), ids)
    assert not bad.passed and bad.max_change > 1e-4 and "NOT causal" in bad.describe()
    assert check_causality(gpt2(), ids).passed


# ---------------------------------------------------------------------- Hugging Face attention functions
def _register(name, fn):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])  # additive float masks


def _scores(module, q, k, mask, scaling):
    s = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    return s


def hf_mask_after_softmax(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
    w = F.softmax(_scores(module, q, k, mask, scaling), dim=-1)
    if mask is not None:
        w = w.masked_fill(mask < -1, 0.0)  # zeroed after the softmax: rows lose their masked mass
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def hf_no_causal_mask(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
    w = F.softmax(_scores(module, q, k, mask, scaling), dim=-1)  # the mask is never applied
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def hf_softmax_wrong_axis(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
    s = _scores(module, q, k, mask, scaling)
    if mask is not None:
        s = s + mask
    w = F.softmax(s, dim=-2)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


HF_BUGS = {"mask_after_softmax": hf_mask_after_softmax, "no_causal_mask": hf_no_causal_mask,
           "softmax_wrong_axis": hf_softmax_wrong_axis}


@pytest.mark.parametrize("bug", BUGS)
def test_broken_transformers_attention_functions_on_gpt2(tmp_path, bug):
    name = f"test_{bug}"
    _register(name, HF_BUGS[bug])
    model = gpt2()
    model.config._attn_implementation_internal = name
    data = torch.randint(1, 128, (2, 4, 12), generator=torch.Generator().manual_seed(0))
    run = train(model, 2, lambda m, s: m(input_ids=data[s], labels=data[s]).loss, tmp_path / "r")
    codes = {f.code for f in attn_findings(run)}
    assert EXPECTED[bug] in codes, describe(run.findings)
    assert {m.split(" ")[0] for m in run.metrics_of("attn")["method"]} == {"returned"}  # its own weights
    assert model.config._attn_implementation == name  # restored
    found = next(f for f in run.findings if f.code == EXPECTED[bug])
    assert found.target in ("transformer.h.0.attn", "transformer.h.1.attn")


def test_padding_ignored_by_a_bidirectional_attention_is_a_padding_leak(tmp_path):
    _register("test_no_mask", hf_no_causal_mask)
    model = bert()
    model.config._attn_implementation_internal = "test_no_mask"
    ids, mask = padded_batch()

    def forward(m, step):
        return m(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean()

    run = train(model, 2, forward, tmp_path / "r")
    found = attn_findings(run)
    assert {f.code for f in found} == {"attn.padding_leak"}, describe(run.findings)
    assert {f.target for f in found} == {"encoder.layer.0.attention.self", "encoder.layer.1.attention.self"}
    assert all(f.severity == "critical" and "padding" in f.message for f in found)


def test_a_padding_leak_is_found_when_only_the_last_of_many_sequences_is_padded(tmp_path):
    # attention.max_sequences (2 here) bounds the sequences checked; padded ones are taken first
    _register("test_no_mask", hf_no_causal_mask)
    model = bert()
    model.config._attn_implementation_internal = "test_no_mask"
    ids = torch.randint(1, 128, (9, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(9, 12, dtype=torch.long)
    mask[8, 7:] = 0  # only the last sequence has padding
    ids[mask == 0] = 0

    def forward(m, step):
        return m(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean()

    run = train(model, 2, forward, tmp_path / "r", config={"attention": {"max_sequences": 2}})
    assert {f.code for f in attn_findings(run)} == {"attn.padding_leak"}, describe(run.findings)


def test_pick_sequences_takes_the_most_padded_then_the_first():
    from stethoscope.attention.checks import pick_sequences

    pad = torch.zeros(8, 10, dtype=torch.bool)
    pad[6, 4:] = True  # 6 padding positions
    pad[3, 8:] = True  # 2
    pad[7, 5:] = True  # 5
    assert pick_sequences(8, 4, pad).tolist() == [0, 1, 6, 7]  # two most padded, then the first two
    assert pick_sequences(8, 5, pad).tolist() == [0, 1, 3, 6, 7]
    assert pick_sequences(8, 3, None).tolist() == [0, 1, 2]
    assert pick_sequences(8, 0, pad) is None and pick_sequences(8, 8, pad) is None  # all of them
    assert pick_sequences(8, 2, torch.zeros(8, 10, dtype=torch.bool)).tolist() == [0, 1]


# ---------------------------------------------------------------------- collapse
class SharpAttention(CausalAttention):
    """Every row attends to the previous token only (one-hot, off the first token): a collapsed head."""

    def forward(self, x):
        b, t, c = x.shape
        v = self.qkv(x)[..., 2 * c :].view(b, t, self.heads, -1).transpose(1, 2)
        idx = torch.arange(t)
        s = torch.full((t, t), -50.0)
        s[idx[1:], idx[:-1]] = 50.0  # row i -> key i-1
        s[0, 0] = 50.0
        w = F.softmax(s.expand(b, self.heads, t, t) + 0 * x.sum(), dim=-1)
        self.last_attn = w.detach() if self.keep_attn else None
        return self.proj((w @ v).transpose(1, 2).reshape(b, t, c))


def test_entropy_collapse_is_found_but_not_on_short_sequences(tmp_path):
    model = TinyLM()
    model.attn = SharpAttention()
    run = train(model, 1, lm, tmp_path / "long")
    found = attn_findings(run)
    assert {f.code for f in found} == {"attn.entropy_collapse"}, describe(found)
    assert found[0].data["heads"] == [0, 1] and "2 of 2 heads" in found[0].message
    short = IDS[..., :4]  # rows with 2+ keys: 3 of them -- too few to call a collapse

    def forward(m, step):
        logits = m(short[step])
        return F.cross_entropy(logits.reshape(-1, 64), short[step].reshape(-1))

    assert not attn_findings(train(model, 1, forward, tmp_path / "short"))


def test_thresholds_are_configurable_per_pattern(tmp_path):
    torch.manual_seed(0)
    config = {"thresholds": [{"pattern": "attn", "rule": "attn.causal_leak", "warning": 2.0, "critical": 3.0}]}
    run = train(TinyLM("no_causal_mask"), 1, lm, tmp_path / "r", config=config)
    assert not [f for f in run.findings if f.code == "attn.causal_leak"]
    run = train(TinyLM("no_causal_mask"), 1, lm, tmp_path / "r2", config={"rules": {"disabled": "attn.*"}})
    assert not attn_findings(run, ("info", "warning", "critical"))
    assert not st.load_run(tmp_path / "r2").metrics_of("attn").empty  # metrics still written
