"""``st.compare`` on real transformers models built from configs: one-module changes are named with their
error, healthy twins (a copy, bf16, torch.compile) report no difference, mismatched structures are typed errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.compare.tolerance import DEFAULT_FACTOR
from stethoscope.errors import StructureMismatchError


def test_a_bit_identical_copy_reports_no_difference(gpt2, ids):
    result = st.compare(gpt2, copy.deepcopy(gpt2), {"input_ids": ids})
    assert result.same and result.identical and result.first is None and result.origin is None
    assert result.match == "name" and len(result.rows) > 20
    assert {r.name for r in result.rows} >= {"transformer.h.0.attn", "transformer.h.1.mlp.act", "lm_head", ""}
    assert result.summary().startswith("no difference") and "bit-identical" in result.summary()


def test_a_layernorm_eps_change_is_named_as_where_the_difference_is_born(gpt2, ids):
    other = copy.deepcopy(gpt2)
    other.transformer.h[1].ln_1.eps = 1e-3  # GPT-2's 1e-5 -> 1e-3
    result = st.compare(gpt2, other, {"input_ids": ids})
    first = result.first
    assert first is result.origin and first.name == "transformer.h.1.ln_1" and first.cls == "LayerNorm"
    assert not first.inputs_differ and first.input_rel == 0.0
    assert first.rel > 1e3 * first.tol and first.max_abs > 0 and first.share > 0.5
    before = [r for r in result.rows if r.order < first.order]
    assert before and all(r.rel == 0.0 for r in before)  # everything before it is bit-identical
    after = next(r for r in result.rows if r.name == "transformer.h.1.attn.c_attn")
    assert after.differs and after.inputs_differ  # downstream modules inherit the difference, not its origin
    assert "transformer.h.1.ln_1" in result.summary() and "born" in result.summary()


def test_a_swapped_activation_is_named(gpt2, ids):
    other = copy.deepcopy(gpt2)
    other.transformer.h[0].mlp.act = nn.ReLU()  # GPT-2's gelu_new swapped for ReLU
    result = st.compare(gpt2, other, {"input_ids": ids})
    assert result.origin.name == "transformer.h.0.mlp.act" and result.first is result.origin
    assert result.origin.cls == "ReLU" and result.origin.rel > 0.1


def _shift_rope(model, shift):
    """Patch the rotary embedding's forward to see ``shift(position_ids)`` (the P-001 mRoPE bug's shape)."""
    rotary = model.model.rotary_emb
    forward = rotary.forward
    rotary.forward = lambda x, position_ids, *a, **k: forward(x, shift(position_ids), *a, **k)
    return model


def test_rope_positions_off_by_one_are_named_at_the_rotary_embedding(llama, ids):
    def off_by_one_after(p):  # positions from token 6 on are one too far, as after a mis-counted segment
        return torch.where(p >= 6, p + 1, p)

    result = st.compare(llama, _shift_rope(copy.deepcopy(llama), off_by_one_after), {"input_ids": ids})
    assert result.origin.name == "model.rotary_emb" and result.first is result.origin
    assert result.origin.rel > 1e-3 and not result.origin.inputs_differ
    attn = next(r for r in result.rows if r.name == "model.layers.0.self_attn")
    assert attn.differs and attn.inputs_differ  # cos / sin reach attention as inputs


def test_a_uniform_rope_shift_changes_cos_sin_but_not_attention(llama, ids):
    """RoPE scores depend on relative positions only: shifting every position by one changes the rotary
    embedding's output but no attention output (agreement within fp32 resolution is the right answer)."""
    result = st.compare(llama, _shift_rope(copy.deepcopy(llama), lambda p: p + 1), {"input_ids": ids})
    assert result.origin.name == "model.rotary_emb"
    attn = next(r for r in result.rows if r.name == "model.layers.0.self_attn")
    assert attn.inputs_differ and not attn.differs and attn.rel < attn.tol
    assert not next(r for r in result.rows if r.name == "lm_head").differs


def test_a_bert_layernorm_eps_change_is_named(bert, ids):
    other = copy.deepcopy(bert)
    other.encoder.layer[1].output.LayerNorm.eps = 1e-2
    result = st.compare(bert, other, {"input_ids": ids})
    assert result.origin.name == "encoder.layer.1.output.LayerNorm" and result.first is result.origin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_of_a_healthy_model_stays_within_its_resolution(llama, ids, dtype):
    result = st.compare(llama, copy.deepcopy(llama).to(dtype), {"input_ids": ids})
    eps = torch.finfo(dtype).eps
    assert result.same and not result.identical
    floats = [r for r in result.rows if r.dtype_b == str(dtype)[6:]]
    assert floats and all(r.tol == pytest.approx(DEFAULT_FACTOR * eps) for r in floats)
    worst = max(r.rel for r in floats)
    assert 0.05 * eps < worst < 4 * eps  # really rounded, and by about one resolution step, no more


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)).eval()


def test_eager_and_torch_compile_report_no_difference():
    """Dynamo graph capture + AOTAutograd (the ``aot_eager`` backend: ~8 s on this CPU; inductor's C++ build
    takes ~30 s, so it has its own slow test below)."""
    model, ids = _tiny_gpt2(), torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    result = st.compare(model, torch.compile(copy.deepcopy(model), backend="aot_eager"), {"input_ids": ids})
    assert result.match == "output" and [r.name for r in result.rows] == [""]
    assert result.same, result.summary()
    assert any("torch.compile" in n for n in result.notes)


@pytest.mark.slow
def test_eager_and_inductor_report_no_difference():
    model, ids = _tiny_gpt2(), torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    result = st.compare(model, torch.compile(copy.deepcopy(model)), {"input_ids": ids})
    assert result.same and result.rows[0].rel < result.rows[0].tol, result.summary()


def test_a_shape_mismatch_is_a_typed_error_naming_the_module_and_both_shapes(ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    a = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32)).eval()
    b = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=48, n_head=2, vocab_size=128, n_positions=32)).eval()
    with pytest.raises(StructureMismatchError) as info:
        st.compare(a, b, {"input_ids": ids})
    err = info.value
    assert err.module == "transformer.wte" and "(2, 12, 32)" in err.shape_a and "(2, 12, 48)" in err.shape_b
    assert "transformer.wte" in str(err) and "(2, 12, 32)" in str(err) and "(2, 12, 48)" in str(err)


def test_a_structure_mismatch_names_the_module_and_both_structures():
    class Two(nn.Module):
        def forward(self, x):
            return x, x * 2

    class One(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(StructureMismatchError, match="module '<model>' returns"):
        st.compare(Two(), One(), torch.ones(3), match="name")


def test_a_renamed_tree_is_paired_by_mapping_or_by_call_order(gpt2, ids):
    base = copy.deepcopy(gpt2.transformer)  # GPT2Model: h.0, ... where the LM says transformer.h.0
    mapped = st.compare(gpt2.transformer, base, {"input_ids": ids}, mapping={"": ""})
    assert mapped.same and mapped.match == "name"

    class Renamed(nn.Module):  # the same layers under other names: only the call order pairs them
        def __init__(self, seq: nn.Sequential):
            super().__init__()
            self.first, self.act, self.last = seq[0], seq[1], seq[2]

        def forward(self, x):
            return self.last(self.act(self.first(x)))

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    renamed = Renamed(copy.deepcopy(seq))
    renamed.act = nn.GELU(approximate="tanh")
    x = torch.randn(5, 8)
    result = st.compare(seq, renamed, x)
    assert result.match == "order"
    assert result.origin.name == "1" and result.origin.name_b == "act"
    by_name = st.compare(seq, renamed, x, mapping={"first": "0", "act": "1", "last": "2"})
    assert by_name.match == "name" and by_name.origin.name == "1"


def test_backward_compares_gradients_of_the_same_loss(gpt2, ids):
    same = st.compare(gpt2, copy.deepcopy(gpt2), {"input_ids": ids, "labels": ids}, backward=True)
    assert same.same and len(same.grads) == len(list(gpt2.parameters()))  # lm_head's weight is wte's
    other = copy.deepcopy(gpt2)
    other.transformer.h[1].ln_2.eps = 1e-2
    diff = st.compare(gpt2, other, {"input_ids": ids, "labels": ids}, backward=True)
    grads = {g.name: g for g in diff.grads}
    assert grads["transformer.h.1.mlp.c_fc.weight"].differs
    assert all(p.grad is None for p in gpt2.parameters())  # the caller's gradients are left as they were


def test_memory_stays_bounded_by_spilling_model_a_to_disk(gpt2, ids):
    other = copy.deepcopy(gpt2)
    other.transformer.h[1].ln_1.eps = 1e-3
    in_memory = st.compare(gpt2, other, {"input_ids": ids})
    budget = 16 * 2**10  # 16 KiB of host memory for model A's copies; the rest goes to disk
    spilled = st.compare(gpt2, other, {"input_ids": ids}, memory_budget=budget)
    assert in_memory.peak_bytes > 4 * budget  # without a budget A's copies take far more than that
    assert 0 < spilled.peak_bytes <= budget and any("temporary folder" in n for n in spilled.notes)
    assert [(r.name, r.rel) for r in spilled.rows] == [(r.name, r.rel) for r in in_memory.rows]


def test_several_batches_keep_each_modules_worst(gpt2, ids):
    other = copy.deepcopy(gpt2)
    other.transformer.h[0].ln_2.eps = 1e-3
    one = st.compare(gpt2, other, {"input_ids": ids[:1]})
    two = st.compare(gpt2, other, [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}])
    assert two.batches == 2 and two.origin.name == one.origin.name == "transformer.h.0.ln_2"
    assert two.origin.rel >= one.origin.rel


def test_table_plot_and_json(gpt2, ids, tmp_path):
    import json

    other = copy.deepcopy(gpt2)
    other.transformer.h[1].ln_1.eps = 1e-3
    result = st.compare(gpt2, other, {"input_ids": ids})
    frame = result.table()
    assert list(frame["name"])[: result.first.order + 1][-1] == "transformer.h.1.ln_1"
    assert {"rel", "max_abs", "share", "tol", "inputs_differ", "tolerances"} <= set(frame.columns)
    layers = [r.name for r in result.layers()]
    assert "transformer.h.0" in layers and "transformer.h.1" in layers and "transformer.h.1.ln_1" in layers
    path = result.plot(tmp_path / "growth.png")
    assert path.stat().st_size > 5000
    data = json.loads(json.dumps(result.as_dict()))
    assert data["first"]["name"] == "transformer.h.1.ln_1" and not data["same"]


def test_bad_inputs_and_options_are_clear_errors(gpt2, ids):
    with pytest.raises(st.StethoscopeError, match="match must be"):
        st.compare(gpt2, gpt2, {"input_ids": ids}, match="fuzzy")
    with pytest.raises(st.StethoscopeError, match="cannot use an input of type str"):
        st.compare(gpt2, gpt2, "hello")
