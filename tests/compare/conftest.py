"""Fixtures for ``stethoscope compare``: tiny seeded transformers models and the console buffer."""

from __future__ import annotations

import sys

import pytest
import torch

from stethoscope import cli
from tests._console import console_text  # noqa: F401  (autouse: seeded torch, one thread, captured console)


@pytest.fixture
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32)).eval()


@pytest.fixture
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        vocab_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


def run_cli(monkeypatch, capsys, console_text, *args) -> tuple[int, str]:  # noqa: F811
    monkeypatch.setattr(sys, "argv", ["stethoscope", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, capsys.readouterr().out + console_text.getvalue()
