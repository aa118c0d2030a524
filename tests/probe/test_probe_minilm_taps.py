"""Taps on a real Hugging Face text backbone: the pretrained MiniLM on UD English EWT (target = genre).

Oracles: the model's own ``output_hidden_states`` / ``pooler_output`` and a plain forward hook, on the
same sentences tokenised as one padded batch; then genre probes on the tapped features.
"""

from __future__ import annotations

import numpy as np
import torch

from stethoscope.probe.config import load_config
from stethoscope.probe.pipeline import _manifest, run_features, run_fit

LAYERS = ["encoder_block_05", "attn_02", "pooler"]
ALIASES = {"attn_02": "encoder.layer.2.attention:output[0]@first", "pooler": ":output.pooler_output"}


def test_cls_last_token_sub_module_and_pooler_taps(tmp_path, ewt_probe_config, minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    cfg = ewt_probe_config(tmp_path / "out")
    cfg["representations"][0].update(layers=LAYERS, aliases=ALIASES, pooling=["mean", "first", "last"])
    cfg = load_config(cfg)
    feats = run_features(cfg, progress=False)["minilm"]
    assert feats.layers == [
        "encoder_block_05@mean", "encoder_block_05@first", "encoder_block_05@last", "attn_02", "pooler",
    ]  # fmt: skip
    assert feats.meta["layers"]["attn_02"]["module"] == "encoder.layer.2.attention:output[0]@first"

    texts = _manifest(cfg, check_audio=False).texts[:40]
    model = AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    captured = {}
    handle = model.encoder.layer[2].attention.register_forward_hook(
        lambda m, i, o: captured.__setitem__("a", o[0])
    )
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True)
    handle.remove()
    h = out.hidden_states[6]  # (B, T, 384): the output of block 5
    mask = batch["attention_mask"].bool()  # (B, T), right padding
    last = mask.sum(1) - 1  # (B,) last non-padding token ([SEP])
    rows = torch.arange(len(texts))
    mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert int(last.min()) < int(last.max())  # sentences of several lengths in the batch
    for name, ref in [
        ("encoder_block_05@mean", mean),
        ("encoder_block_05@first", h[:, 0]),  # [CLS]
        ("encoder_block_05@last", h[rows, last]),
        ("attn_02", captured["a"][:, 0]),
        ("pooler", out.pooler_output),
    ]:
        np.testing.assert_allclose(feats.array(name)[:40], ref.numpy(), atol=2e-4, err_msg=name)

    by = {r["layer"]: r for r in run_fit(cfg, progress=False).rows}
    assert by["encoder_block_05@mean"]["target_f1"] > 0.5  # five balanced genres: chance is 0.2
    assert all(r["target_f1"] > 0.3 for r in by.values())
