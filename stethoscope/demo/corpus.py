"""The demo's training text and its batches.

The corpus is the Python Language Reference topics from the standard library's ``pydoc_data.topics``
(CPython 3.11.7, PSF License Version 2), bundled as ``data/python-docs-topics.txt``; ``data/SOURCE.md``
says how it was made and ``data/LICENSE-PSF.txt`` carries the licence. Real English prose with code in it,
466 KB, and nothing to download.

The model reads raw UTF-8 bytes (vocabulary 256), so "tokenising" is ``bytes -> uint8 tensor``.
Batches are random windows drawn with a private ``torch.Generator``: the same seed gives the same batches,
whatever else the process does with the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources

import torch

CORPUS_FILE = "python-docs-topics.txt"
SOURCE_FILE = "SOURCE.md"
LICENSE_FILE = "LICENSE-PSF.txt"
CORPUS_DESCRIPTION = "Python 3.11.7 reference topics (pydoc_data.topics), PSF License Version 2"


def corpus_bytes() -> bytes:
    """The bundled corpus as raw UTF-8 bytes."""
    return resources.files("stethoscope.demo").joinpath("data", CORPUS_FILE).read_bytes()


def encode(text: str) -> torch.Tensor:
    """Text -> (N,) int64 byte ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Byte ids -> text; a multi-byte character cut in half becomes U+FFFD rather than an error."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(values).decode("utf-8", errors="replace")


class ByteCorpus:
    """The corpus as one long byte tensor, split into a training part and a held-out tail.

    Args:
        val_fraction: the share of the text, taken from its end, kept out of training.

    Example:
        >>> corpus = ByteCorpus()
        >>> x, y = next(corpus.batches(batch_size=4, block_size=8, seed=0))
        >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
        (torch.Size([4, 8]), True)
    """

    def __init__(self, val_fraction: float = 0.1):
        data = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8)
        n_val = int(len(data) * val_fraction)
        self.data = data  # (N,) uint8
        self.train = data[: len(data) - n_val]
        self.val = data[len(data) - n_val :]

    def __len__(self) -> int:
        return len(self.data)

    def get_batch(
        self, batch_size: int, block_size: int, generator: torch.Generator, split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of random windows: inputs x (B, T) and next-byte targets y (B, T), both int64."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)  # (B,)
        offsets = torch.arange(block_size + 1)  # (T+1,)
        windows = data[starts[:, None] + offsets].long()  # (B, T+1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # y is x shifted by one byte

    def batches(
        self, batch_size: int, block_size: int, seed: int = 0, split: str = "train"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless, deterministic stream of batches for ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.get_batch(batch_size, block_size, generator, split)
