"""Gathers one sampled step's device-side rows and brings them to the host in one transfer per device.

Hooks add raw statistic rows (still on the device) as they fire; nothing is read back until
:meth:`StepCollector.fetch`, which concatenates each device's rows and copies them with a single
``.cpu()``. Repeated calls of one module in a step are merged exactly on the host (Chan's parallel
variance for the spread; a per-feature max kept on the device for dead features).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stethoscope.stats import _IDX, RAW_WIDTH, Stats, finalize, merge_host_rows


@dataclass
class Entry:
    """One row waiting for the host: where it came from and how to read it."""

    kind: str  # act | grad | update | scalar | ...
    name: str
    output: str = ""  # path inside a structured output ("" for a bare tensor)
    call: int = 0  # call index of the module within the step
    count: int = 0  # elements in the tensor (host-known)
    features: int = 0  # last-dimension size when dead features were counted
    width: int = RAW_WIDTH
    parts: int = 1  # device tensors the row was queued as (joined at fetch)
    device: torch.device | None = None
    offset: int = 0  # into the device's concatenated buffer, set by fetch()
    extra: dict = field(default_factory=dict)


def to_host(t: torch.Tensor) -> np.ndarray:
    """The one device-to-host copy of a step (a no-op view for CPU tensors)."""
    return t.detach().cpu().numpy()


class StepCollector:
    """Pending rows of the current sampled step."""

    def __init__(self, eps: float):
        self.eps = eps
        self.entries: list[Entry] = []
        self._rows: list[torch.Tensor] = []
        self._features: dict[tuple, torch.Tensor] = {}  # (kind, name, output) -> running (C,) max |x|
        self._mismatched: set[tuple] = set()  # keys whose calls had different feature widths

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: Entry, row: torch.Tensor, *more: torch.Tensor) -> None:
        """Queue a 1-D float32 device row; ``more`` parts (same device) are appended to it without a ``cat``
        here (the one ``cat`` at :meth:`fetch` joins everything)."""
        entry.device = row.device
        width = 0
        for part in (row, *more):
            if part.dim() != 1 or part.dtype != torch.float32:
                part = part.reshape(-1).to(torch.float32)
            width += part.shape[0]
            self._rows.append(part)
        entry.width = width
        entry.parts = 1 + len(more)
        self.entries.append(entry)

    def clear(self) -> None:
        """Drop every queued row (the monitor let go of the model: nothing queued may keep a tensor)."""
        self.entries, self._rows, self._features, self._mismatched = [], [], {}, set()

    def add_feature_absmax(self, key: tuple, per_feature: torch.Tensor) -> None:
        """Merge a call's per-feature max |x| into the step's running max for ``key``."""
        if key in self._mismatched:
            return
        prev = self._features.get(key)
        if prev is None:
            self._features[key] = per_feature
        elif prev.shape != per_feature.shape or prev.device != per_feature.device:
            # calls with different feature widths cannot be merged: the dead count is unknown (NaN)
            del self._features[key]
            self._mismatched.add(key)
        else:
            self._features[key] = torch.maximum(prev, per_feature)

    def _dead_counts(self, keys: list[tuple]) -> list[torch.Tensor]:
        """Per key, a float32 device scalar: features whose merged max |x| is <= eps. Keys whose vectors have
        one length and device are counted in one stacked reduction (a model has a handful of widths)."""
        vectors = [self._features[k] for k in keys]
        counts: list[torch.Tensor | None] = [None] * len(keys)
        for members in _stack_groups(vectors).values():
            block = torch.stack([vectors[i] for i in members]) if len(members) > 1 else vectors[members[0]][None]
            dead = torch.le(block.reshape(len(members), -1), self.eps).sum(1).to(torch.float32)  # (k,)
            for j, i in enumerate(members):
                counts[i] = dead[j]
        return counts

    def fetch(self) -> tuple[list[Entry], list[np.ndarray], dict[tuple, float]]:
        """Copy every queued row to the host: one ``cat`` and one ``.cpu()`` per device.

        Returns the entries, their host rows in the same order, and the dead-feature count of each
        merged feature key.
        """
        feature_keys = list(self._features)
        dead_rows = self._dead_counts(feature_keys)
        by_device: dict[torch.device, list[int]] = {}
        starts = []  # each entry's first part in self._rows
        pos = 0
        for i, entry in enumerate(self.entries):
            by_device.setdefault(entry.device, []).append(i)
            starts.append(pos)
            pos += entry.parts
        dead_device = {}
        for j, k in enumerate(feature_keys):
            dead_device.setdefault(self._features[k].device, []).append(j)
        host_rows: list[np.ndarray | None] = [None] * len(self.entries)
        dead: dict[tuple, float] = {}
        for device in set(by_device) | set(dead_device):
            idx = by_device.get(device, [])
            didx = dead_device.get(device, [])
            parts = [p for i in idx for p in self._rows[starts[i]:starts[i] + self.entries[i].parts]]
            parts += [dead_rows[j].reshape(1) for j in didx]
            if not parts:
                continue
            host = to_host(torch.cat(parts))
            pos = 0
            for i in idx:
                w = self.entries[i].width
                host_rows[i] = host[pos : pos + w]
                pos += w
            for j in didx:
                dead[feature_keys[j]] = float(host[pos])
                pos += 1
        entries = self.entries
        self.entries, self._rows, self._features, self._mismatched = [], [], {}, set()
        return entries, host_rows, dead


def _stack_groups(vectors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``vectors`` grouped by (device, length): each group is stacked into one (k, C) reduction."""
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(vectors):
        groups.setdefault((v.device, v.shape[0] if v.dim() == 1 else -1 - i), []).append(i)
    return groups


def merge_stats(parts: list[tuple[np.ndarray, int]], features: int, dead: float | None) -> Stats:
    """Merge raw rows of several calls (each with its element count) into one :class:`Stats`."""
    if len(parts) == 1:  # one call: its row as it is, with the merged dead count where there is one
        raw, count = parts[0]
        if dead is not None:
            raw = np.array(raw, dtype=np.float64)
            raw[_IDX["dead"]] = dead
        return finalize(raw, count, features)
    merged = merge_host_rows([raw for raw, _ in parts], [count for _, count in parts])
    merged[_IDX["dead"]] = math.nan if dead is None else dead
    return finalize(np.asarray(merged), sum(count for _, count in parts), features)


class AsyncScalars:
    """Logged CUDA scalars of unsampled steps, copied to pinned host memory without waiting for the GPU.

    ``mon.log(loss=loss)`` must not stall the stream on every step. On an unsampled step the values are
    queued with a non-blocking copy and a CUDA event; they are read once the event has completed (polled at
    each step boundary), or waited for before a sampled step's flush and at ``close()``, so records are
    still written in step order. CPU tensors never come here: reading them costs nothing.
    """

    def __init__(self) -> None:
        self._inflight: deque = deque()
        self._free: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._inflight)

    def submit(self, step: int | None, pending: dict | None, names: list[str],
               tensors: list[torch.Tensor], values: dict[str, float]) -> None:
        device = tensors[0].device
        stacked = torch.stack([t.to(device=device, dtype=torch.float32).reshape(()) for t in tensors])  # (k,)
        buf = next((b for b in self._free if b.numel() >= stacked.numel()), None)
        if buf is None:
            buf = self._host_buffer(max(64, stacked.numel()))
        else:
            self._free.remove(buf)
        buf[: stacked.numel()].copy_(stacked, non_blocking=True)
        event = self._event(device)
        # ``stacked`` is kept alive until the copy has finished reading it
        self._inflight.append((step, pending, names, buf, event, values, stacked))

    @staticmethod
    def _host_buffer(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, pin_memory=True)  # (n,) page-locked: async copies

    @staticmethod
    def _event(device: torch.device) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def ready(self, block: bool):
        """Yield ``(step, pending, values)`` of completed copies in submission order."""
        while self._inflight:
            step, pending, names, buf, event, values, _stacked = self._inflight[0]
            if not block and not event.query():
                return
            event.synchronize()
            self._inflight.popleft()
            host = buf[: len(names)].numpy()  # pinned host memory: a plain read
            values = dict(values) | {name: float(v) for name, v in zip(names, host, strict=True)}
            self._free.append(buf)
            yield step, pending, values
