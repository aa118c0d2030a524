"""Fixtures shared by every test folder: tiny seeded models and fresh run directories.

Kept small and general on purpose; each subfolder adds its own ``conftest.py`` for what only it needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

SEED = 0


def seed_everything(seed: int = SEED) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 LM (tied embedding / LM head) with random weights, built from a config, seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    seed_everything()
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


class TinyMLP(nn.Sequential):
    """8 -> 16 -> 4 with a ReLU: the smallest model that has every kind of row (act, input, grad, update)."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4):
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@pytest.fixture
def tiny_mlp() -> nn.Module:
    seed_everything()
    return TinyMLP()


@pytest.fixture
def run_dir(tmp_path: Path) -> Callable[[str], Path]:
    """A factory of fresh (not yet existing) run directory paths: ``run_dir()``, ``run_dir("second")``."""
    counter = itertools.count()

    def make(name: str | None = None) -> Path:
        return tmp_path / (name or f"run{next(counter)}")

    return make
