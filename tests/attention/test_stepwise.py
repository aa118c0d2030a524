"""Step-by-step mode on tiny GPT-2 (causal LM), Llama (GQA), the demo model and the real MiniLM, and the CLI."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import stethoscope as st
from stethoscope import cli
from stethoscope.demo.model import GPTConfig, TinyGPT

from .conftest import gpt2, llama_gqa, minilm_dir


def test_gpt2_step_by_step_shows_masks_row_sums_loss_and_top5(tmp_path, tokenizer, _attention_env):
    model = gpt2(vocab=len(tokenizer))
    model.train()  # step-by-step runs in eval mode and puts the mode back
    result = st.attention.step_by_step(model, tokenizer, "the cat sat on the mat", out_dir=tmp_path)
    assert model.training and model.config._attn_implementation == "sdpa"
    t = len(result.tokens)
    assert result.tokens[0] == "[CLS]" and t == 8
    assert len(result.heads) == 2 * 2 and result.causal and result.is_lm
    for h in result.heads:
        assert all(abs(s - 1) < 1e-6 for s in h.row_sums)
        assert all(h.masked_scores[i][j] == -math.inf for i in range(t) for j in range(i + 1, t))
        assert all(h.weights[i][j] == 0 for i in range(t) for j in range(i + 1, t))
        assert h.weights[0][0] == pytest.approx(1.0)  # row 0 sees only token 0
        assert h.q["shape"] == [t, 16] and h.raw_scores[0][1] != -math.inf
    # loss: next-token cross-entropy of the same model
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([result.input_ids])).logits[0]
    model.train()
    want = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(result.input_ids[1:]))
    assert result.loss == pytest.approx(float(want), rel=1e-5)
    assert [p["id"] for p in result.top_k] == logits[-1].topk(5).indices.tolist()
    assert result.causality.passed
    log = (tmp_path / "step-by-step.log").read_text()
    assert "(sum=1.0000)" in log and "-inf" in log and "top-5 next tokens" in log
    assert f"'{result.top_k[0]['token']}'" in log and "causality check" in log and ": causal" in log
    data = json.loads((tmp_path / "step-by-step.json").read_text())
    assert data["heads"][0]["masked_scores"][0][1] == "-inf" and len(data["top_k"]) == 5
    assert len(result.heatmaps) == 4 and all(p.stat().st_size > 1000 for p in result.heatmaps)
    printed = _attention_env.getvalue()
    assert "transformer.h.1.attn · head 1" in printed and "(sum=1.0000)" in printed


def test_llama_gqa_shares_key_heads(tokenizer):
    model = llama_gqa(vocab=len(tokenizer))
    result = st.attention.step_by_step(model, tokenizer, "the cat sat", heatmaps=False, show=False)
    assert [h.kv_head for h in result.heads[:4]] == [0, 0, 1, 1]
    assert result.heads[0].k == result.heads[1].k and result.heads[0].k != result.heads[2].k
    assert all(abs(s - 1) < 1e-6 for h in result.heads for s in h.row_sums)
    assert result.loss is not None and len(result.top_k) == 5 and result.causality.passed


def test_demo_model_from_text_without_tokenizer(tmp_path):
    model = TinyGPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    result = st.attention.step_by_step(model, None, "hello, world!", out_dir=tmp_path, show=False, max_tokens=6)
    assert result.tokens == list("hello,") and "only the first 6" in result.notes[0]
    assert all(h.returned_diff is not None and h.returned_diff < 1e-6 for h in result.heads)  # its own weights
    assert result.loss is not None and result.top_k and result.causality.passed
    assert all(not b.attn.keep_attn and b.attn.last_attn is None for b in model.transformer.h)


def test_minilm_encoder_has_no_predictions(tokenizer):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True)
    result = st.attention.step_by_step(model, tokenizer, "Stethoscopes listen to models.", heatmaps=False,
                                       show=False)
    assert not result.causal and not result.is_lm and result.loss is None and result.top_k is None
    assert "no language-model head" in result.top_k_note and result.causality is None
    assert len(result.heads) == 6 * 12
    assert all(math.isfinite(v) for h in result.heads for row in h.masked_scores for v in row)  # nothing masked


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gpt2-ckpt")
    gpt2(vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_trace_attention_on_a_saved_checkpoint(monkeypatch, capsys, _attention_env, checkpoint, tmp_path):
    out = tmp_path / "t"
    monkeypatch.setattr(sys, "argv", ["stethoscope", "trace", str(checkpoint), "--text", "the cat sat on",
                                      "--out", str(out), "--attention", "--depth", "1"])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    text = capsys.readouterr().out + _attention_env.getvalue()
    assert code == 0, text
    assert "attention step by step" in text and "(sum=1.0000)" in text and "top-5 next tokens" in text
    assert (out / "trace.jsonl").is_file()
    log = (out / "attention" / "step-by-step.log").read_text()
    assert "-inf" in log and "causality check" in log
    assert len(list((out / "attention" / "heatmaps").glob("*.png"))) == 4
