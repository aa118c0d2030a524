"""``logits.divergence`` induced, not simulated: a tiny Phi LM (its head has a bias) trained on real text (UD
English EWT) with the LM head at a high learning rate drives log Z away and opens the finding; the same run with
the head at the learning rate of the rest stays silent."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
import torch

import stethoscope as st
from stethoscope.logits.extension import find_heads, logit_row
from tests.moe.conftest import QUIET

DATA = Path("/work/shared/data/ud-english-ewt/en_ewt-ud-dev.conllu")
VOCAB = 2000


def corpus() -> torch.Tensor:
    if not DATA.exists():
        pytest.skip("UD English EWT is not in /work/shared/data")
    text = [ln[9:] for ln in DATA.read_text(encoding="utf-8").splitlines() if ln.startswith("# text = ")]
    words = [w for ln in text for w in re.findall(r"\w+|[^\w\s]", ln.lower())]
    vocab = {w: i + 1 for i, (w, _) in enumerate(collections.Counter(words).most_common(VOCAB - 1))}
    return torch.tensor([vocab.get(w, 0) for w in words])  # 0: out of vocabulary


def run(head_lr: float, run_dir: Path, steps: int = 12) -> tuple[list[dict], list[dict], list[float]]:
    from transformers import PhiConfig, PhiForCausalLM

    ids = corpus()
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=64, resid_pdrop=0.0,
                                     embd_pdrop=0.0))
    head = [p for n, p in model.named_parameters() if n.startswith("lm_head")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("lm_head")]
    opt = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": head, "lr": head_lr}], weight_decay=0.0)
    mon = st.Monitor(model, opt, run_dir=run_dir, config=QUIET)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        with mon.step(step):
            start = torch.randint(0, len(ids) - 33, (4,), generator=g)
            x = torch.stack([ids[i : i + 32] for i in start])  # (4, 32)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss.item())
            losses.append(loss.item())
    mon.close()
    findings = [json.loads(x) for x in (run_dir / "findings.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [f for f in findings if f["code"] == "logits.divergence"], \
        [m for m in metrics if m.get("kind") == "logits"], losses


def test_high_head_lr_drives_log_z_away_and_opens_the_finding(tmp_path):
    found, rows, losses = run(1.0, tmp_path / "high")
    opened = [f for f in found if f["event"] == "open"]
    assert [f["target"] for f in opened] == ["lm_head"]
    first = opened[0]
    assert first["value"] >= 20.0 and first["data"]["drift_log_z"] > 20.0  # log Z ran up, far from 0
    assert rows[0]["log_z"] == pytest.approx(7.6, abs=0.2)  # log(2000) with near-zero logits at the start
    assert max(r["log_z"] for r in rows) > 30.0
    assert "1e-4 * log(Z)^2" in first["hint"]
    assert losses[first["step"]] > losses[0]  # the loss is already worse than at the start


def test_safe_head_lr_stays_silent(tmp_path):
    found, rows, losses = run(1e-3, tmp_path / "safe")
    assert found == []
    assert max(abs(r["log_z"] - rows[0]["log_z"]) for r in rows) < 2.0
    assert losses[-1] < losses[0]


def test_head_found_and_row_matches_a_naive_reference():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    assert list(find_heads(model, "auto")) == ["lm_head"]
    z = torch.randn(3, 10, 64) * 4 - 2  # (B, T, V)
    row = logit_row(z, max_rows=64).tolist()
    flat = z.reshape(-1, 64)
    lse = torch.logsumexp(flat, -1)
    assert row[0] == 30 and row[7] == 64
    assert row[1] / 30 == pytest.approx(float(flat.mean()), rel=1e-5)
    assert row[2] / 30 == pytest.approx(float(lse.mean()), rel=1e-5)
    assert row[3:7] == pytest.approx([float(lse.max()), float(lse.min()), float(flat.max()), float(flat.min())])
    assert logit_row(z, max_rows=8).tolist()[0] == 8  # strided: every 4th of the 30 rows
