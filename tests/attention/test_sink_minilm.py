"""The real pretrained MiniLM: heads that park their attention on [CLS] are found and named, as info only."""

from __future__ import annotations

import torch

import stethoscope as st

from .conftest import QUIET, minilm_dir

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Stethoscopes listen to models while they train.",
    "I went to the store yesterday and bought some apples and pears.",
    "Attention sinks are a known pattern in pretrained transformers.",
]


def test_minilm_sinks_are_info_findings_naming_layer_heads_and_token(tmp_path, tokenizer):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    mon = st.Monitor(model, run_dir=tmp_path / "r", config=QUIET)
    mon.extension("attention").tokenizer = tokenizer
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with mon.step(0), torch.no_grad():
        model(**batch)
    mon.close()
    run = st.load_run(tmp_path / "r")
    attn = [f for f in run.findings if f.code.startswith("attn.")]
    assert attn and all(f.code == "attn.sink" and f.severity == "info" for f in attn), [
        (f.code, f.target, f.message) for f in attn]
    assert run.verdict["status"] == "healthy"
    by_target = {f.target: f for f in attn}
    # every named target is an attention module of the model, as named_modules() spells it
    names = dict(model.named_modules())
    assert all(t in names and t.endswith("attention.self") for t in by_target)
    assert len(by_target) >= 4  # most layers have [CLS] sinks
    f = by_target["encoder.layer.2.attention.self"]
    assert f.data["token"] == "first" and f.data["token_id"] == tokenizer.cls_token_id
    assert "'[CLS]'" in f.message and "known, usually benign" in f.message
    assert f.data["heads"] and all(f.data["shares"][str(h)] >= 0.5 for h in f.data["heads"])
    # the metrics agree with the finding's heads
    m = run.metrics_of("attn")
    layer2 = m[m["name"] == "encoder.layer.2.attention.self"].set_index("head")
    assert {int(h) for h in layer2.index[layer2["sink_share"] >= 0.5]} == set(f.data["heads"])
    assert (m["padding_mass"] == 0).all() and (m["row_sum_error"] < 1e-5).all()
