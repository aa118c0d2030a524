"""Statistics of sharded parameters (FSDP2 / DTensor, FSDP1) as of the *full* parameter, never gathered.

Under FSDP each rank holds a part of every parameter and of its gradient. A statistic of one part (its norm,
its zero fraction) is not the parameter's, and gathering the tensor to measure it would cost a full copy per
parameter. Instead each rank computes its part's raw row (:func:`stethoscope.stats.tensor_stats`), the rows
are rewritten as additive and max-able columns, and ranks combine them with two small all-reduces per group
of parameters sharded alike — ``(K, 7)`` summed and ``(K, 3)`` maxed, float64, on the parameters' device —
then turn them back into one raw row per parameter (Chan's parallel variance, like
:func:`stethoscope.stats.merge_host_rows`). Update ratios combine ``‖Δw‖²`` and ``‖w‖²`` of the parts the same
way (one ``(K, 2)`` sum).

These are collectives: the reader enters them only on steps every rank samples (the schedule), in the order
of ``model.named_parameters()``, which is the same on every rank.

What counts as sharded (:func:`watched_parameters`):

* a DTensor parameter with a ``Shard`` placement (FSDP2 ``fully_shard``, HSDP, FSDP2 + tensor parallel):
  parts are disjoint along each ``Shard`` mesh dimension and reduced over each of those dimensions' groups in
  turn; ``Replicate`` dimensions hold copies and are not reduced; a ``Partial`` placement (a pending sum) is
  not supported and the parameter is left out;
* an original parameter of an FSDP1 unit with ``use_orig_params=True`` (a 1-D view of the part in this rank's
  shard, empty when none is);
* an FSDP1 ``FlatParameter`` (``use_orig_params=False``): split back into the original parameters by the
  handle's shard metadata, each named as in the unwrapped model.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stethoscope.naming import clean_name
from stethoscope.stats import _IDX, RAW_WIDTH


@dataclass(eq=False)
class ShardedParam:
    """One full parameter of which this rank holds a part.

    ``param`` is the tensor the optimizer holds (a DTensor, an FSDP1 view, or a flat parameter); ``span`` is
    ``(offset, numel)`` of this parameter inside the local flat shard (FSDP1 flat parameters), None for the
    whole local tensor; ``groups`` the process groups whose ranks hold disjoint parts, reduced over in turn.
    """

    name: str
    param: nn.Parameter
    groups: tuple
    numel: int  # elements of the full parameter
    span: tuple[int, int] | None = None

    @property
    def requires_grad(self) -> bool:
        return self.param.requires_grad

    def local(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's part of ``t`` (the parameter or its gradient) as a plain tensor; None when absent."""
        if t is None:
            return None
        t = _to_local(t)
        if self.span is not None:
            off, n = self.span
            t = t.reshape(-1)[off : off + n]  # (n,) this parameter's entries of the flat shard
        return t

    def local_grad(self) -> torch.Tensor | None:
        g = self.local(self.param.grad)
        if g is None and self.span is None and self.local(self.param.detach()).numel() == 0:
            # FSDP1 (use_orig_params) leaves no gradient where the rank holds no entry: an empty part
            return self.local(self.param.detach())
        return g


def _to_local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor
    return to_local() if callable(to_local) else t


def _dtensor_groups(p: torch.Tensor) -> tuple | None:
    """Process groups of a DTensor's ``Shard`` mesh dimensions; None when not sharded or not supported."""
    placements = getattr(p, "placements", None)
    mesh = getattr(p, "device_mesh", None)
    if placements is None or mesh is None:
        return None
    if any(pl.is_partial() for pl in placements):
        return None  # a pending sum: no statistic of the full tensor follows from the parts
    dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if not dims:
        return ()  # replicated on every dimension: each rank's local tensor is the full one
    return tuple(mesh.get_group(mesh_dim=i) for i in dims)


def _fsdp1_layout(model: nn.Module) -> dict[int, list[ShardedParam]]:
    """id(parameter) -> its ShardedParams, for every FSDP1 unit in ``model`` (empty without FSDP1)."""
    out: dict[int, list[ShardedParam]] = {}
    if not torch.distributed.is_available() or "torch.distributed.fsdp" not in sys.modules:
        return out  # a model wrapped in FSDP1 has imported it: no import cost for everyone else
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    flat_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for unit in model.modules():
        handle = getattr(unit, "_handle", None) if isinstance(unit, FSDP) else None
        if handle is None:
            continue
        flat = handle.flat_param
        sharded = bool(getattr(handle, "uses_sharded_strategy", True))
        groups = (unit.process_group,) if sharded and unit.process_group.size() > 1 else ()
        infos, fqns, numels = flat._shard_param_infos, flat._fqns, flat._numels
        if getattr(handle, "_use_orig_params", False):
            for p, numel in zip(flat._params, numels, strict=True):
                out[id(p)] = [ShardedParam("", p, groups, int(numel))]
            continue
        raw = flat_names.get(id(flat), "")
        prefix = clean_name(raw.rsplit("_flat_param", 1)[0].rstrip("."))
        parts = []
        offsets = _unsharded_offsets(flat) if not sharded else None
        for i, (info, fqn, numel) in enumerate(zip(infos, fqns, numels, strict=True)):
            if not sharded:
                span = (offsets[i], int(numel))
            else:
                span = (int(info.offset_in_shard), int(info.numel_in_shard)) if info.in_shard else (0, 0)
            name = clean_name(f"{prefix}.{fqn}" if prefix else fqn)
            parts.append(ShardedParam(name, flat, groups, int(numel), span))
        out[id(flat)] = parts
    return out


def _unsharded_offsets(flat: Any) -> list[int]:
    """Where each original parameter starts in an unsharded (NO_SHARD) flat parameter, alignment padding
    skipped."""
    offsets, pos = [], 0
    pad = list(getattr(flat, "_is_padding_mask", []) or [])
    numels = list(getattr(flat, "_numels_with_padding", flat._numels))
    for numel, is_pad in zip(numels, pad or [False] * len(numels), strict=True):
        if not is_pad:
            offsets.append(pos)
        pos += int(numel)
    return offsets


def watched_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter | ShardedParam]]:
    """``model.named_parameters()`` by clean name, each sharded one as a :class:`ShardedParam` (an FSDP1 flat
    parameter as one per original parameter), the others as themselves."""
    fsdp1 = _fsdp1_layout(model)
    for raw, p in model.named_parameters():
        parts = fsdp1.get(id(p))
        if parts is not None:
            for sp in parts:
                if not sp.name:
                    sp.name = clean_name(raw)
                yield sp.name, sp
            continue
        name = clean_name(raw)
        groups = _dtensor_groups(p)
        if groups is None and getattr(p, "placements", None) is not None:
            continue  # a Partial DTensor: not supported (docs/distributed.md)
        if groups is not None:
            yield name, ShardedParam(name, p, groups, p.numel())  # DTensor numel: the global one
        else:
            yield name, p


def split(params: list[tuple[str, Any]]) -> tuple[list[tuple[str, nn.Parameter]], list[ShardedParam]]:
    """(plain parameters, sharded ones) of a watched list."""
    plain = [(n, p) for n, p in params if not isinstance(p, ShardedParam)]
    return plain, [p for _, p in params if isinstance(p, ShardedParam)]


def local_device(sp: ShardedParam) -> torch.device:
    return _to_local(sp.param).device


def batches(parts: list[ShardedParam]) -> list[tuple[tuple, list[ShardedParam]]]:
    """Parts grouped by (device, groups), in first-seen order: one collective per batch, the same on every
    rank."""
    out: dict[tuple, list[ShardedParam]] = {}
    for sp in parts:
        key = (local_device(sp), tuple(id(g) for g in sp.groups))
        out.setdefault(key, []).append(sp)
    return [(b[0].groups, b) for b in out.values()]


# Columns of the summed block (float64): finite entries, their sum, the parts' own squared deviations, each
# part's sum² / its finite count (Chan's between-parts term), zero and saturated counts, non-finite count.
_SUM_COLS = 7


def _all_reduce(t: torch.Tensor, op: Any, groups: tuple) -> None:
    import torch.distributed as dist

    for g in groups:
        dist.all_reduce(t, op=op, group=g)


def combine_rows(rows: torch.Tensor, counts: list[int], groups: tuple) -> torch.Tensor:
    """Raw rows of the full tensors from each rank's raw rows of its parts, with no host read.

    ``rows``: ``(K, RAW_WIDTH)`` float32, one per parameter, of this rank's part (``counts[k]`` entries, 0 for
    an empty part). Returns ``(K, RAW_WIDTH)`` float32 on the same device, equal on every rank; the dead
    column is NaN (gradients count no features).
    """
    wide = torch.float32 if rows.device.type == "mps" else torch.float64
    r = rows.to(wide)  # (K, W)
    n = torch.tensor(counts, dtype=wide, device=rows.device)  # (K,)
    nonfinite = torch.where(n > 0, r[:, _IDX["nonfinite"]], 0.0)
    finite = n - nonfinite
    has = finite > 0  # parts with a finite entry carry sums and extremes
    total = torch.where(has, r[:, _IDX["sum"]], 0.0)
    sums = torch.stack([
        finite, total, torch.where(has, r[:, _IDX["dev_norm"]] ** 2, 0.0),
        total * total / finite.clamp_min(1.0),
        torch.where(has, r[:, _IDX["zero"]], 0.0), torch.where(has, r[:, _IDX["saturated"]], 0.0), nonfinite,
    ], dim=1)  # (K, 7)
    neg_inf = -math.inf
    ext = torch.stack([
        torch.where(has, r[:, _IDX["max"]], neg_inf), torch.where(has, -r[:, _IDX["min"]], neg_inf),
        torch.where(has, r[:, _IDX["absmax"]], neg_inf),
    ], dim=1)  # (K, 3): max, -min, absmax
    import torch.distributed as dist

    _all_reduce(sums, dist.ReduceOp.SUM, groups)
    _all_reduce(ext, dist.ReduceOp.MAX, groups)
    f_all, s_all = sums[:, 0], sums[:, 1]
    m2 = (sums[:, 2] + sums[:, 3] - s_all * s_all / f_all.clamp_min(1.0)).clamp_min(0.0)
    nan = torch.full_like(f_all, math.nan)
    any_finite = f_all > 0
    out = torch.stack([
        sums[:, 6], torch.where(any_finite, s_all, nan), torch.where(any_finite, m2.sqrt(), nan),
        torch.where(any_finite, -ext[:, 1], nan), torch.where(any_finite, ext[:, 0], nan),
        torch.where(any_finite, ext[:, 2], nan), sums[:, 4], sums[:, 5], nan,
    ], dim=1)  # (K, RAW_WIDTH)
    assert out.shape[1] == RAW_WIDTH
    return out.to(torch.float32)


def combine_norms(squares: torch.Tensor, groups: tuple) -> torch.Tensor:
    """Norms of full tensors from each rank's squared norms of its parts: ``(K, C)`` -> ``(K, C)``."""
    import torch.distributed as dist

    total = squares.to(torch.float32 if squares.device.type == "mps" else torch.float64)
    _all_reduce(total, dist.ReduceOp.SUM, groups)
    return total.sqrt().to(torch.float32)
