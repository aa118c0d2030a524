"""One sampled step's statistics rows, each distinct tensor computed once.

A hidden state feeds several modules (a residual stream is the output of one block and the input of the
next), so rows are cached per tensor identity within a step; the cache is dropped at every step boundary.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch

from stethoscope.stats import SMALL_ELEMENTS, CompiledStats, Scratch, stacked_stats, tensor_stats


def tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's contents within a step (same storage, view and version)."""
    try:
        return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
    except Exception:  # tensors without storage (e.g. some subclasses): never deduplicated
        return (id(t), None)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Statistics in the tensor's own precision, whatever autocast region the hook fires in.

    Outside an autocast region nothing is entered (entering one costs more than a small tensor's statistics).
    """
    if _autocast_on(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast_on(device_type: str) -> bool:
    """Whether an autocast region is active for ``device_type`` (only CUDA and CPU have one here)."""
    if device_type not in ("cuda", "cpu"):
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class StatsEngine:
    """Device-side statistics rows (see :mod:`stethoscope.stats`), eager or compiled per ``stats.compile``.

    Args:
        stats_config: the config's ``stats`` section (``eps``, ``saturation``, ``compile``).
        on_error: ``(where, exc)`` for a compiled kernel that failed and fell back to eager.
    """

    def __init__(self, stats_config, on_error: Callable[[str, BaseException], None]):
        self.cfg = stats_config
        self._compiled = CompiledStats(on_error=on_error)
        self._scratch = Scratch()  # work buffers reused by every statistic (3 x 2 MiB per device at most)
        self._dedup: dict[tuple, tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def new_step(self) -> None:
        self._dedup = {}

    def row(self, t: torch.Tensor, features: bool, key: tuple | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(raw row, per-feature max |x| or None) of ``t``, from the step's cache when already computed.

        ``key``: ``tensor_key(t)`` when the caller has it already."""
        key = tensor_key(t) if key is None else key
        cached = self._dedup.get(key)
        # a dead tensor's memory may have been reused; a row cached without features cannot serve one with
        if cached is not None and cached[0]() is not None and (not features or cached[1][1] is not None):
            return cached[1]
        feats: list[torch.Tensor] = []
        # in the tensor's own precision, as no_autocast; without it no context manager is entered at all here
        kind = t.device.type
        if _autocast_on(kind):
            with torch.autocast(kind, enabled=False):
                row = self.compute(t, features, feats)
        else:
            row = self.compute(t, features, feats)
        result = (row, feats[0] if feats else None)
        self._dedup[key] = (weakref.ref(t), result)
        return result

    def compute(self, t: torch.Tensor, features: bool, feats: list | None, eps: float | None = None) -> torch.Tensor:
        """The eager engine, or the compiled one where ``stats.compile`` asks for it (see CompiledStats).

        ``eps``: entries with ``|x| <= eps`` count as zero (default ``stats.eps``; gradients pass 0: only exact
        zeros are dead, see docs/findings.md#gradzero_fraction)."""
        cfg = self.cfg
        eps = cfg.eps if eps is None else eps
        mode = cfg.compile
        if mode == "always" or (mode == "auto" and t.device.type == "cuda"):
            return self._compiled(t, eps, cfg.saturation, features, feats, self._scratch)
        return tensor_stats(t, eps, cfg.saturation, features=features, feature_absmax=feats, scratch=self._scratch)

    @staticmethod
    def stackable(t: torch.Tensor) -> bool:
        """Small enough to be summarised stacked with others (see :meth:`compute_small`)."""
        return 0 < t.numel() <= SMALL_ELEMENTS and not t.is_complex()

    def compute_small(self, tensors: list[torch.Tensor], eps: float | None = None) -> list[torch.Tensor]:
        """Rows (no features) of small tensors: those of one length, device and dtype are stacked and summarised
        in one go (see :data:`stethoscope.stats.SMALL_ELEMENTS`); a tensor alone in its group, on its own."""
        rows: list[torch.Tensor | None] = [None] * len(tensors)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.numel(), t.device, t.dtype), []).append(i)
        eps = self.cfg.eps if eps is None else eps
        for (n, device, _), members in groups.items():
            with no_autocast(device):
                if len(members) == 1:
                    rows[members[0]] = self.compute(tensors[members[0]], False, None, eps=eps)
                    continue
                stacked = torch.stack([tensors[i].detach().reshape(n) for i in members])  # (k, n)
                block = stacked_stats(stacked, eps, self.cfg.saturation)  # (k, RAW_WIDTH)
            for j, i in enumerate(members):
                rows[i] = block[j]
        return rows
