"""Model A's recorded tensors, kept only until model B's matching call has been compared.

Memory stays bounded on a large model: A's tensors are copied to host memory up to ``budget`` bytes, past it
they are written to a temporary folder and read back one at a time; each is dropped as soon as the last
comparison that needs it is done. A tensor handed on unchanged from one module to the next (the same object,
same in-place version) is stored once.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch

DEFAULT_BUDGET = 512 * 2**20  # bytes of host memory before spilling to disk


class ReferenceStore:
    """Blobs (tensors) with reference counts, in memory up to ``budget`` bytes and on disk beyond."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self.in_memory = 0
        self.peak = 0
        self.spilled = 0  # blobs written to disk
        self._blobs: dict[int, torch.Tensor | Path] = {}
        self._refs: dict[int, int] = {}
        self._size: dict[int, int] = {}
        self._alias: dict[int, tuple[weakref.ref, int, int]] = {}  # id(tensor) -> (ref, version, blob)
        self._next = 0
        self._dir: Path | None = None

    def put(self, t: torch.Tensor) -> int:
        """Keep a copy of ``t`` (or count one more use of an identical tensor already kept); returns its id."""
        hit = self._alias.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] in self._blobs:
            self._refs[hit[2]] += 1
            return hit[2]
        blob = self._next
        self._next += 1
        copy = t.detach().to("cpu", copy=True)
        size = copy.numel() * copy.element_size()
        if self.in_memory + size > self.budget:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="stethoscope-compare-"))
            path = self._dir / f"{blob}.pt"
            torch.save(copy, path)
            self._blobs[blob] = path
            self.spilled += 1
            size = 0
        else:
            self._blobs[blob] = copy
            self.in_memory += size
            self.peak = max(self.peak, self.in_memory)
        self._size[blob] = size
        self._refs[blob] = 1
        self._alias[id(t)] = (weakref.ref(t), t._version, blob)
        return blob

    def get(self, blob: int) -> torch.Tensor:
        """The tensor kept under ``blob`` (read back from disk if it was spilled)."""
        value = self._blobs[blob]
        if isinstance(value, Path):
            return torch.load(value, weights_only=True)
        return value

    def release(self, blob: int) -> None:
        """One use of ``blob`` is done; the last one frees it."""
        if blob not in self._refs:
            return
        self._refs[blob] -= 1
        if self._refs[blob] <= 0:
            value = self._blobs.pop(blob)
            self.in_memory -= self._size.pop(blob)
            del self._refs[blob]
            if isinstance(value, Path):
                value.unlink(missing_ok=True)

    def close(self) -> None:
        """Drop everything, and the spill folder with it."""
        self._blobs.clear()
        self._refs.clear()
        self._alias.clear()
        self.in_memory = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
