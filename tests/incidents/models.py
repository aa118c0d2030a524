"""The seeded model and data the incident tests train, importable as a ``--factory`` (tests.incidents.models:tiny_gpt)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from stethoscope.demo.model import GPTConfig, TinyGPT

VOCAB, T = 64, 16
INJECTED = "transformer.h.1.attn.c_attn"  # the module whose weight the tests set to +inf


def tiny_gpt() -> TinyGPT:
    """The demo's TinyGPT, small and seeded (the replay's factory: the same architecture as the run)."""
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=3, n_head=2, n_embd=32))


class Tokens(Dataset):
    """Seeded random token sequences; item ``i`` is ``(x, y, i)`` so a test knows each batch's indices."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, VOCAB, (n, T + 1), generator=g)  # (n, T+1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        row = self.data[i]
        return row[:-1], row[1:], i


def loader(batch_size: int = 4, seed: int = 2) -> DataLoader:
    """Shuffled by a seeded RandomSampler: the order is known only through the indices."""
    return DataLoader(Tokens(), batch_size=batch_size,
                      sampler=RandomSampler(Tokens(), generator=torch.Generator().manual_seed(seed)))


def inject_inf(model: TinyGPT) -> None:
    """One +inf weight in :data:`INJECTED`: its output goes non-finite while its input is finite."""
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[0, 0] = float("inf")
