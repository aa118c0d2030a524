"""From a layer's hidden states to one vector per item: poolings over valid steps, and per-item selections.

Every pooling of a layer is computed from the same captured tensor inside the forward hook, so
``pooling: [mean, mean_std, last]`` costs one forward pass. A 2-D output (already one vector per item, e.g. an
RNN's final state or a pooler output) has nothing to pool: it is stored once, as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stethoscope.probe.taps import POOLINGS

NONE = "none"  # the pooling recorded for a 2-D output stored as it is


def step_mask(mask: torch.Tensor | None, batch: int, steps: int, device: torch.device) -> torch.Tensor:
    """(B, T) float mask of valid steps on a layer's own time axis.

    Args:
        mask: (B, T_in) valid steps of the input; when T_in differs from ``steps`` (strided audio frames)
            each item's valid length is scaled proportionally (ceil, at least one step). None = all valid.
        batch: B.
        steps: T of the layer.
        device: where the mask goes.
    """
    if mask is None:
        return torch.ones(batch, steps, device=device)
    mask = mask.to(device)
    if mask.shape[1] == steps:
        return mask.float()
    valid = torch.ceil(mask.float().sum(1) * (steps / mask.shape[1])).clamp(1, steps)  # (B,)
    return (torch.arange(steps, device=device)[None] < valid[:, None]).float()


def pool_steps(h: torch.Tensor, m: torch.Tensor, modes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every requested pooling of one hidden state, sharing the mean between ``mean``, ``std`` and ``mean_std``.

    Args:
        h: (B, T, H) float32 hidden states.
        m: (B, T) float mask of valid steps (1 = valid).
        modes: names from :data:`POOLINGS`.

    Returns:
        ``{mode: (B, D)}``.
    """
    B, T, _ = h.shape
    out: dict[str, torch.Tensor] = {}
    n = m.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1)
    mean = std = None
    if {"mean", "std", "mean_std"} & set(modes):
        mean = torch.einsum("bth,bt->bh", h, m) / n  # (B, H)
    if {"std", "mean_std"} & set(modes):
        var = torch.einsum("bth,bt->bh", (h - mean[:, None]).square(), m) / n  # (B, H)
        std = var.sqrt()
    valid = m > 0  # (B, T)
    steps = torch.arange(T, device=h.device)
    rows = torch.arange(B, device=h.device)
    for mode in modes:
        if mode == "mean":
            out[mode] = mean
        elif mode == "std":
            out[mode] = std
        elif mode == "mean_std":
            out[mode] = torch.cat([mean, std], dim=1)  # (B, 2H)
        elif mode == "max":
            out[mode] = h.masked_fill(~valid[..., None], float("-inf")).amax(1)  # (B, H)
        elif mode == "first":
            first = torch.where(valid, steps, T).amin(1).clamp_max(T - 1)  # (B,) first valid step
            out[mode] = h[rows, first]
        elif mode == "last":
            last = torch.where(valid, steps, -1).amax(1).clamp_min(0)  # (B,) last valid step
            out[mode] = h[rows, last]
        else:
            raise ValueError(f"unknown pooling {mode!r}; choose from {', '.join(POOLINGS)}")
    return out


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str, time_axis: int = 1) -> torch.Tensor:
    """Pool a layer output over time with one pooling.

    Args:
        hidden: (B, T, H) (or the time axis elsewhere, see ``time_axis``); (B, H) is returned as is, for
            every mode (an already pooled output has no steps: no zero "std" columns are invented).
        mask: (B, T_in) valid steps of the input (see :func:`step_mask`).
        mode: a name from :data:`POOLINGS`.
        time_axis: where T is in ``hidden``.

    Returns:
        (B, D) float32.
    """
    h = hidden.float()
    if h.dim() == 2:
        return h
    h = to_steps(h, time_axis)
    return pool_steps(h, step_mask(mask, h.shape[0], h.shape[1], h.device), [mode])[mode]


def to_steps(h: torch.Tensor, time_axis: int = 1) -> torch.Tensor:
    """(B, T, H) view of a batch-first output whose time axis is ``time_axis``; trailing axes are flattened."""
    if time_axis != 1:
        h = h.movedim(time_axis, 1)
    return h.reshape(h.shape[0], h.shape[1], -1)  # (B, T, H)
