"""Fixtures for the integration tests: tiny GPT-2 language models and token datasets, a quiet console."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console

VOCAB, SEQ = 64, 16

# Fast, quiet monitor settings shared by the framework tests: every step sampled, tables-only report.
FAST = {"sampling": {"warmup_steps": 10, "every": 10}, "report": {"plots": False}, "console": {"quiet": True}}


@pytest.fixture(autouse=True)
def quiet_console(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("STETHOSCOPE_DISABLE", raising=False)
    set_console(Console(file=io.StringIO(), width=120, color_system=None))
    yield
    set_console(None)


def tiny_gpt2_lm(seed: int = 0):
    """A 2-layer GPT-2 language model (32 wide) from a config, random weights, seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def token_rows(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` deterministic rows of SEQ token ids."""
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM examples ``{"input_ids", "labels"}`` for the Hugging Face Trainer."""

    def __init__(self, n: int, seed: int = 0):
        self.rows = token_rows(n, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def grad_norm(params) -> float:
    """The global L2 norm of the current gradients (the naive reference)."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return total ** 0.5
