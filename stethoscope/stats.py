"""Exact whole-tensor statistics computed on the tensor's own device, with no host synchronisation.

Each call returns a small float32 *device* row of raw reductions; rows are stacked and cross to the host
once per sampled step (:mod:`stethoscope.collector`), where :func:`finalize` turns them into the
published statistics. Nothing here calls ``.item()`` or branches on a tensor value, so a CUDA stream is
never stalled per tensor.

Why this shape (measured on CPU, 8x128x1536 float32): a plain ``sum`` or ``dot`` is ~0.05 ms while
``isfinite(x).sum()`` is ~7 ms and a boolean ``.sum()`` ~1.5 ms. So non-finite entries are replaced by 0
once (``nan_to_num``), every count is a comparison written into a reused float buffer and summed as
floats, and the non-finite count is "how many entries changed" (NaN != 0, ±Inf != 0). Statistics of the
finite entries then follow exactly:

* sum and min/max come from the zero-filled copy, corrected where the fill could matter;
* the variance is two-pass (sum of squared deviations from the device-side mean), so a large mean does not
  cancel the spread (|mean| >> std is common for LayerNorm weights and positional embeddings); the
  deviations are scaled by a power of two that brings max |x| near 1, so their squares neither overflow
  nor underflow in float32 whatever the magnitude, and the scale leaves every rounding unchanged;
* the zero count subtracts the fills, which are zeros that were not in the data.

Complex tensors are summarised by their magnitude; integer and bool tensors are not summarised.

CPU tensors take a shorter road (:func:`_host_chunk`). Their values already live in host memory and every
CPU kernel has finished when it returns, so reading a scalar back is not a transfer and stalls nothing. The
engine reads each chunk's sum: when it is finite, every entry is (NaN and ±Inf propagate into a sum), and
the finite-only bookkeeping above is skipped. What the host then knows skips more: the squares' minimum
shows that no entry lies near zero (no |x| pass, no zero count, no per-feature maximum: no feature can be
dead), the saturation count runs on the squares, and no saturation pass runs when |x| never exceeds the
bound. A chunk with a non-finite entry, and every tensor on an accelerator, go through the device road,
which never reads a value back. Small tensors of one length are summarised stacked
(:func:`stacked_stats`): their cost is the kernel launches, not the entries.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Layout of the raw device row (float32). The element count stays on the host as a Python int.
RAW_FIELDS = (
    "nonfinite",  # entries that are NaN or ±Inf
    "sum",  # sum of finite entries
    "dev_norm",  # sqrt of the sum of squared deviations of finite entries from their mean: a norm, so
    # float32 holds it for any finite input (the sum of squares itself over- or underflows past |x| ~ 1e19
    # or below ~ 1e-19)
    "min",  # minimum of finite entries
    "max",  # maximum of finite entries
    "absmax",  # max |x| over finite entries
    "zero",  # finite entries with |x| <= eps
    "saturated",  # finite entries with |x| > saturation bound
    "dead",  # last-dimension features with |x| <= eps in every row (activations only, else NaN)
)
RAW_WIDTH = len(RAW_FIELDS)
_IDX = {name: i for i, name in enumerate(RAW_FIELDS)}

# Published statistic columns (metrics.jsonl), in order.
STAT_COLUMNS = (
    "count",
    "mean",
    "std",
    "min",
    "max",
    "absmax",
    "norm",
    "zero_fraction",
    "saturation_fraction",
    "nonfinite",
    "dead_features",
    "features",
)


def is_summarisable(t: object) -> bool:
    """True for floating and complex tensors with data (the ones that get statistics; 'meta' has none)."""
    return (
        isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.device.type != "meta"
    )


# Tensors are processed in chunks of at most this many elements, so the temporary buffers stay bounded
# (3 x 4 MiB per device at float32) however large the tensor — logits of a big vocabulary included. The
# size is also a speed choice: the passes over a chunk then mostly hit the CPU's cache instead of memory
# (measured on a 2-core EPYC with 32 MiB of L3: 8x128x8192 logits 31.7 ms at 4M-element chunks, 14.2 ms at
# 512K with three buffers written per chunk; with the one work buffer of today's host road, 1M is 2-10 %
# faster than 512K, and 2M faster still for 1-2M-entry tensors but slower for logits: 1M keeps a chunk and
# its work buffer at 8 MiB, inside the last-level cache of most CPUs).
CHUNK_ELEMENTS = 1 << 20


class Scratch:
    """Reusable float32 work buffers, one set per device, so sampled steps do not allocate per tensor."""

    def __init__(self, size: int = CHUNK_ELEMENTS):
        self.size = size
        self._buffers: dict[torch.device, torch.Tensor] = {}
        # (device, n) -> the three views: a model has a handful of chunk lengths, and slicing three views
        # costs more than the passes over a small tensor's chunk
        self._views: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Three (n,) float32 views on ``device`` (n <= size)."""
        views = self._views.get((device, n))
        if views is not None:
            return views
        buf = self._buffers.get(device)
        if buf is None or buf.shape[1] < n:
            buf = torch.empty((3, max(n, 1024)), dtype=torch.float32, device=device)
            self._buffers[device] = buf
            self._views = {k: v for k, v in self._views.items() if k[0] != device}  # views of the old buffer
        if len(self._views) >= _MAX_VIEWS:
            self._views.clear()
        views = self._views[(device, n)] = (buf[0, :n], buf[1, :n], buf[2, :n])
        return views

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()


_MAX_VIEWS = 256  # distinct chunk lengths kept (a model with more just slices again)


def tensor_stats(
    t: torch.Tensor,
    eps: float = 1e-8,
    saturation: float = 3.0,
    features: bool = False,
    feature_absmax: list[torch.Tensor] | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """Raw statistics of ``t`` as a float32 row of width :data:`RAW_WIDTH` on ``t``'s device.

    Args:
        t: a floating or complex tensor of any shape, contiguous or not; it is never modified.
        eps: entries with |x| <= eps count as zero.
        saturation: entries with |x| > saturation count as saturated.
        features: also count dead features (last-dimension entries that are <= eps in every row).
        feature_absmax: when given (with ``features``), the per-feature max |x| vector ``(C,)`` is appended
            to it, so calls of one module can be merged exactly (a feature is dead only if dead in all). On
            the host road a tensor with a chunk where no entry lies within eps of zero gives +inf for every
            feature instead (none can be dead): only whether a feature's max exceeds eps is ever read.
        scratch: reusable work buffers (one is made for the call when None).

    The element count is ``t.numel()`` (known on the host); pass it to :func:`finalize` with the row.
    An empty tensor gives NaN statistics with zero counts.
    """
    if t.numel() == 0:
        row = torch.full((RAW_WIDTH,), math.nan, dtype=torch.float32, device=t.device)
        row[[_IDX["nonfinite"], _IDX["zero"], _IDX["saturated"]]] = 0.0
        return row
    scratch = scratch or Scratch(min(t.numel(), CHUNK_ELEMENTS))
    src = t.detach()
    if src.is_complex():
        src = src.abs()
    want_features = features and t.dim() >= 2
    width = t.shape[-1] if want_features else 1
    flat = src.reshape(-1)  # (n,) a view when contiguous
    n = flat.numel()
    step = max(width, (scratch.size // width) * width)  # whole rows per chunk
    if reads_host(flat.device):
        return _host_stats(flat, n, step, width if want_features else 0, eps, saturation, scratch,
                           feature_absmax)
    rows, per_feature = [], None
    for start in range(0, n, step):
        chunk = flat[start : start + step]
        row, chunk_features = _chunk_stats(chunk, eps, saturation, width if want_features else 0, scratch)
        rows.append(row)
        if chunk_features is not None:
            per_feature = chunk_features if per_feature is None else torch.maximum(per_feature, chunk_features)
    if per_feature is not None:
        dead = torch.le(per_feature, eps).sum().to(torch.float32)
        if feature_absmax is not None:
            feature_absmax.append(per_feature)
    else:
        dead = torch.full((), math.nan, dtype=torch.float32, device=t.device)
    merged = rows[0] if len(rows) == 1 else _merge_rows(torch.stack(rows), [min(step, n - s) for s in
                                                                            range(0, n, step)])
    merged[_IDX["dead"]] = dead
    return merged


def reads_host(device: torch.device) -> bool:
    """Whether statistics on ``device`` may read values back (CPU: host memory, nothing to wait for)."""
    return device.type == "cpu"


def _host_stats(
    flat: torch.Tensor, n: int, step: int, width: int, eps: float, saturation: float, scratch: Scratch,
    feature_absmax: list[torch.Tensor] | None,
) -> torch.Tensor:
    """:func:`tensor_stats` for a CPU tensor ``(n,)``: chunk rows read and merged on the host in float64.

    A chunk with no entry within eps of zero holds every feature alive (chunks are whole rows), so then no
    feature of the tensor is dead: the count is 0 without a pass, and the per-feature vector handed on is
    :func:`_all_alive` (+inf, "above eps" for every feature).
    """
    if n <= step:  # one chunk (most tensors): no slicing, no merge
        rows = [_host_row(flat, eps, saturation, width, scratch)]
        counts = [n]
    else:
        rows, counts = [], []
        for start in range(0, n, step):
            chunk = flat[start : start + step]
            rows.append(_host_row(chunk, eps, saturation, width, scratch))
            counts.append(chunk.numel())
    merged = rows[0][0] if len(rows) == 1 else merge_host_rows([r for r, _ in rows], counts)
    per_feature = None
    if width:
        if any(f is None for _, f in rows):  # a chunk without an entry near zero: every feature is alive
            merged[_IDX["dead"]] = 0.0
            per_feature = _all_alive(width)
        else:
            for _, chunk_features in rows:
                per_feature = chunk_features if per_feature is None else torch.maximum(per_feature, chunk_features)
            merged[_IDX["dead"]] = float(torch.le(per_feature, eps).sum())
        if feature_absmax is not None:
            feature_absmax.append(per_feature)
    else:
        merged[_IDX["dead"]] = math.nan
    return torch.from_numpy(np.array(merged, dtype=np.float32))  # (RAW_WIDTH,) (cheaper than torch.tensor)


def _host_row(chunk: torch.Tensor, eps: float, saturation: float, width: int, scratch: Scratch):
    """(host row, per-feature max |x| or None) of one chunk: :func:`_host_chunk`, or the device road for a chunk
    holding a non-finite entry (exact over the finite entries). None for the features: none can be dead."""
    row, chunk_features = _host_chunk(chunk, eps, saturation, width, scratch)
    if row is None:
        device_row, chunk_features = _chunk_stats(chunk, eps, saturation, width, scratch)
        return device_row.tolist(), chunk_features
    return row, chunk_features


@functools.lru_cache(maxsize=64)
def _all_alive(width: int) -> torch.Tensor:
    """``(C,)`` +inf on the CPU: the per-feature vector of a tensor in which no feature can be dead (only
    whether a feature's max exceeds eps is ever read). Shared: callers never modify it in place."""
    return torch.full((width,), math.inf, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _float32(value: float) -> float:
    """``value`` rounded to float32, as the kernels compare against it."""
    return float(np.float32(value))


def _host_chunk(
    chunk: torch.Tensor, eps: float, saturation: float, width: int, scratch: Scratch
) -> tuple[list[float] | None, torch.Tensor | None]:
    """Raw row of a CPU chunk whose entries are all finite, as host floats; ``(None, None)`` otherwise.

    With it the per-feature max |x| ``(C,)``, or None where ``width`` is 0 or no entry lies within eps of zero
    (then no feature can be dead).

    Four to nine passes: the sum (which also proves every entry finite), min/max, the sum of squares (or,
    under a dominant mean, the deviations from it with their sum and sum of squares) with the squares'
    minimum, then only where some entry lies within eps of zero the per-feature max and the zero count (on
    the squares, or on x when the chunk is one-signed; |x| only where neither decides), and the saturation
    count (on the squares, or skipped when |x| never exceeds the bound).
    """
    m = chunk.numel()
    # Every pass writes into ``work`` when it can, and the last one over |x| in place: a buffer line the
    # model's own kernels evicted since the last statistic costs a read before its first write (measured:
    # a freshly written 8x128x384 activation took 0.65 ms beside 0.42 ms hot, mostly those refills).
    work, spare, copy = scratch.get(chunk.device, m)  # (m,) float32 each
    x = chunk if chunk.dtype == torch.float32 else copy.copy_(chunk)  # statistics of the float32 values
    total = float(x.sum())
    if not math.isfinite(total):  # NaN / ±Inf somewhere (or a float32 sum overflowing): the device road
        return None, None
    lo, hi = (float(v) for v in torch.aminmax(x))
    absmax = max(hi, -lo)
    # the kernels compare in float32: the host decides against the same rounded bounds
    eps32, saturation32 = _float32(eps), _float32(saturation)
    safe = _SAFE_LOW <= absmax <= _SAFE_HIGH or absmax == 0.0
    dev_norm = None
    min_square = saturated = zero = square_features = None
    if safe:
        # One pass for the spread when the mean is small beside the root mean square (LayerNorm outputs,
        # residual streams, logits, gradients): sum x^2 - (sum x)^2 / n then loses at most a factor
        # 1 / (1 - mean^2 / ms) <= 2 of the sum of squares' own relative precision
        squares = float(_sum_of_squares(x, work))
        if total * total <= _ONE_PASS_SHARE * squares * m:
            dev_norm = math.sqrt(max(squares - total * total / m, 0.0))
            min_square = float(work.amin())  # the squares are still in ``work``: (min |x|)^2, rounded
            eps_square = _square_bound(eps)
            if lo < 0.0 < hi and eps_square is not None and min_square <= eps_square:
                # an entry within eps of zero (dropout, pruned units), seen exactly on the squares: the zero
                # count and the per-feature maximum read them too, before the saturation count overwrites
                # them (no |x| pass). sqrt(fl(x * x)) = |x| in float32's normal range, and below it both
                # sides stay under eps: the per-feature vector decides deadness exactly as max |x| would.
                if width:
                    square_features = _feature_absmax(work, width).sqrt_()  # (C,)
                zero = float(torch.le(work, eps_square, out=spare).sum())
            bound = _square_bound(saturation)
            if absmax > saturation32 and bound is not None:  # counted on the squares: no |x| pass
                saturated = float(torch.gt(work, bound, out=work).sum())
    if dev_norm is None:  # a dominant mean, or magnitudes whose squares leave float32: centre (and scale)
        mean32 = float(np.float32(total / m))  # the mean the float32 kernel subtracts
        scale = 1.0 if safe else _unit_scale(max(absmax, _TINY))
        if scale == 1.0:
            dev = torch.sub(x, mean32, out=work)  # deviations from the float32-rounded mean
        else:  # (x - mean) * 2^k, with the same roundings as x - mean
            dev = torch.mul(x, scale, out=work).sub_(mean32 * scale)
        # their sum first, then their squares in place
        drift, squares = torch.stack([dev.sum(), dev.mul_(dev).sum()]).tolist()
        # Corrected two-pass, as on the device road: the deviations' own sum removes the rounded mean's bias
        dev_norm = math.sqrt(max(squares - drift * drift / m, 0.0)) / scale
        total = m * mean32 + drift / scale
    # The smallest |x| decides the zero count and the dead features: known from the extremes for a chunk of
    # one sign, else from the squares' minimum where that clearly exceeds eps^2 (no |x| pass at all), else read.
    signed = lo < 0.0 < hi
    mag = None if lo < 0.0 else x  # |x| once a pass needs it; a non-negative chunk is its own
    if not signed:
        smallest = min(abs(lo), abs(hi))
    elif zero is not None:  # counted on the squares above: some entry is within eps of zero
        smallest = 0.0
    elif min_square is not None and min_square > eps32 * eps32 * _SQUARE_MARGIN:
        smallest = math.sqrt(min_square)  # above eps
    elif eps32 == 0.0 and not width:  # only exact zeros count, and nothing else needs |x| (gradients)
        zero = float(torch.eq(x, 0.0, out=work).sum())
        smallest = 0.0 if zero else math.inf
    else:
        mag = torch.abs(x, out=work)
        # a square clearly below eps^2 proves an entry within eps of zero (dropout, pruned units): no read
        within = min_square is not None and min_square + _SQUARE_ULP < eps32 * eps32 / _SQUARE_MARGIN
        smallest = 0.0 if within else float(mag.amin())
    near_zero = smallest <= eps32  # some entry lies within [-eps, eps]
    if near_zero and mag is None and zero is None:  # a non-positive chunk reaching zero
        mag = torch.abs(x, out=work)
    if not width:
        per_feature = None
    elif near_zero:
        per_feature = square_features if square_features is not None else _feature_absmax(mag, width)  # (C,)
    else:  # no feature can be dead (the chunk holds whole rows, every entry above eps)
        per_feature = None
    over_hi, over_lo = hi > saturation32, -lo > saturation32  # entries beyond +bound / -bound may exist
    if zero is None:
        zero = 0.0
        if near_zero:  # mag is known here; the flags never go over the caller's tensor, nor over a |x| still read
            out = work if mag is x else (spare if (over_hi or over_lo) and saturated is None else mag)
            zero = float(torch.le(mag, eps, out=out).sum())
    if saturated is not None:
        pass
    elif not (over_hi or over_lo):
        saturated = 0.0
    elif mag is None and not (over_hi and over_lo):  # one side only: count it on x, no |x| pass
        flags = torch.gt(x, saturation, out=work) if over_hi else torch.lt(x, -saturation, out=work)
        saturated = float(flags.sum())
    else:
        if mag is None:
            mag = torch.abs(x, out=work)
        saturated = float(torch.gt(mag, saturation, out=work).sum())  # over |x| itself when it is ``work``
    return [0.0, total, dev_norm, lo, hi, absmax, zero, saturated, 0.0], per_feature


# Within these bounds on max |x| a chunk's squared deviations stay inside float32's normal range
# (chunks hold at most 2^19 entries of at most 2^51 squared 2^102: sum < 2^121); outside them the host road
# scales by a power of two first.
_SAFE_LOW, _SAFE_HIGH = 2.0**-40, 2.0**51
_TINY = 2.0**-126  # smallest normal float32: the device road's scale is taken from max(max |x|, this)
# The host road takes the one-pass spread when mean^2 <= this share of the mean square (see _host_chunk).
_ONE_PASS_SHARE = 0.5
# A rounded square above eps^2 times this proves |x| > eps, with room for the square's rounding.
_SQUARE_MARGIN = 1.0 + 2.0**-18
_SQUARE_ULP = 2.0**-149  # the absolute rounding of a square that fell below float32's normal range


@functools.lru_cache(maxsize=64)
def _square_bound(bound: float) -> float | None:
    """T with |x| > bound exactly when fl(x * x) > T for every float32 x, or None where no such T exists.

    T = fl(b * b) for the float32 bound b: |x| <= b gives fl(x²) <= T (rounding keeps order) and |x| >= the
    next float32 after b gives a square at least 2^-22 larger, over two float32 steps, so above T. That holds
    while the squares stay in float32's normal range, which is checked.
    """
    b = np.float32(bound)
    after = np.nextafter(b, np.float32(np.inf))
    with np.errstate(over="ignore", under="ignore"):
        square, next_square = b * b, after * after
    if not (np.isfinite(next_square) and square >= np.finfo(np.float32).tiny and square < next_square):
        return None
    return float(square)


def _sum_of_squares(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Sum of x^2 as a 0-dim tensor, through ``work`` (same shape as x, overwritten).

    Not ``torch.dot``: BLAS accumulates a dot in float32 lanes, measured 7e-5 off on 512K ReLU deviations,
    where squaring into a buffer and torch's own (cascaded) sum is 2e-8 off, for ~40 % more time.
    """
    return torch.mul(x, x, out=work).sum()


def _unit_scale(absmax: float) -> float:
    """The power of two that brings ``absmax`` (> 0) into [1, 2)."""
    return 2.0 ** -math.floor(math.log2(absmax))


def _feature_absmax(mag: torch.Tensor, width: int) -> torch.Tensor:
    """Per-feature max ``(C,)`` of ``mag`` viewed as ``(rows, C)``.

    On a multi-threaded CPU each thread reduces its own block of rows, then the blocks are combined: the
    threads then read the rows they wrote in the passes before, instead of splitting the buffer by columns,
    which leaves its cache lines on the other core so that the next chunk's writes wait for them (measured:
    ~10 % of the engine on 2 threads). Rows that do not divide into the blocks are reduced on their own.
    """
    rows = mag.numel() // width
    blocks = torch.get_num_threads() if mag.device.type == "cpu" else 1
    if blocks < 2 or rows < 2 * blocks:
        return mag.view(rows, width).amax(0)
    even = rows - rows % blocks
    per_feature = mag[: even * width].view(blocks, even // blocks, width).amax(1).amax(0)  # (C,)
    if even < rows:
        per_feature = torch.maximum(per_feature, mag[even * width :].view(-1, width).amax(0))
    return per_feature


def merge_host_rows(rows: list, counts: list[int]) -> list[float]:
    """Merge raw rows held on the host (chunks of a tensor, or calls of a module) into one, in float64.

    Chan's parallel variance, as :func:`_merge_rows` on the device. Rows without a finite entry (all NaN/Inf,
    or an empty tensor's NaN row) add their non-finite count and nothing else; the dead count is left NaN
    for the caller, who knows how the features combine.
    """
    nonfinite = sum(float(r[_IDX["nonfinite"]]) for r, n in zip(rows, counts, strict=True) if n)
    parts = [(n - float(r[_IDX["nonfinite"]]), r) for r, n in zip(rows, counts, strict=True) if n]
    parts = [(f, r) for f, r in parts if f > 0]  # rows with a finite entry
    nan = math.nan
    if not parts:
        return [nonfinite, nan, nan, nan, nan, nan, 0.0, 0.0, nan]
    finite = sum(f for f, _ in parts)
    total = sum(float(r[_IDX["sum"]]) for _, r in parts)
    mean = total / finite
    m2 = sum(float(r[_IDX["dev_norm"]]) ** 2 + f * (float(r[_IDX["sum"]]) / f - mean) ** 2 for f, r in parts)
    return [
        nonfinite, total, math.sqrt(m2),
        min(float(r[_IDX["min"]]) for _, r in parts), max(float(r[_IDX["max"]]) for _, r in parts),
        max(float(r[_IDX["absmax"]]) for _, r in parts), sum(float(r[_IDX["zero"]]) for _, r in parts),
        sum(float(r[_IDX["saturated"]]) for _, r in parts), nan,
    ]


def _chunk_stats(
    chunk: torch.Tensor, eps: float, saturation: float, width: int, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Statistics of one 1-D chunk (length a multiple of ``width`` when ``width`` > 0).

    About 14 elementwise passes over three reused buffers, exact over the finite entries: magnitudes first
    (they also give the finite indicator), then the signed statistics, where the non-finite slots are set to
    the mean (inside the finite range for min/max, and exactly zero deviation for the variance).
    """
    m = chunk.numel()
    signed, fill, mag = scratch.get(chunk.device, m)  # (m,) float32 each
    if chunk.dtype != torch.float32:  # half / bfloat16 / float64: statistics are of the float32 values
        chunk = mag.copy_(chunk)
    torch.nan_to_num(chunk, nan=0.0, posinf=0.0, neginf=0.0, out=signed)  # finite entries, 0 elsewhere
    torch.ne(signed, chunk, out=fill)  # 1.0 where the entry was NaN or ±Inf (NaN != 0, Inf != 0)
    nonfinite = fill.sum()
    torch.abs(signed, out=mag)  # |x| of finite entries, 0 elsewhere
    total = signed.sum()
    count = (m - nonfinite).clamp_min(1.0)
    mean = total / count  # mean of the finite entries, a device scalar
    signed.addcmul_(fill, mean)  # non-finite slots become the mean (inside the finite range); others exact
    lo, hi = torch.aminmax(signed)
    absmax = torch.maximum(hi, -lo)  # the extremes are finite values: no pass over |x| needed
    # a power of two with max |x| * scale in [1, 2): the scaled squares stay inside float32's range
    scale = torch.exp2(-torch.floor(torch.log2(absmax.clamp_min(_TINY))))
    # (x - mean) * scale in one pass; exactly 0 at the non-finite slots, and rounded as x - mean would be
    dev = torch.addcmul(-mean * scale, signed, scale, out=signed)
    # Corrected two-pass (Chan, Golub & LeVeque): the float32 mean is off by a few ulps, which would bias
    # every deviation when |mean| >> std; subtracting (sum of deviations)^2 / n removes that bias.
    drift = dev.sum()
    dev_norm = (_sum_of_squares(dev, fill) - drift * drift / count).clamp_min(0.0).sqrt() / scale
    total = total + drift / scale

    per_feature = _feature_absmax(mag, width) if width else None  # (C,)
    zero = torch.le(mag, eps, out=fill).sum() - nonfinite  # non-finite slots are zeros not in the data
    saturated = torch.gt(mag, saturation, out=fill).sum()
    dead = torch.zeros((), dtype=torch.float32, device=chunk.device)
    row = torch.stack([nonfinite, total, dev_norm, lo, hi, absmax, zero, saturated, dead])
    return row, per_feature


# Tensors of at most this many elements are summarised together (:func:`stacked_stats`): for them the ~12
# kernel launches of a row cost more than the elements (a 384-element LayerNorm gradient: ~110 µs alone on
# a 2-core CPU, a few µs as one of 38 rows).
SMALL_ELEMENTS = 1 << 14


def stacked_stats(x: torch.Tensor, eps: float, saturation: float) -> torch.Tensor:
    """Raw rows ``(k, RAW_WIDTH)`` of k tensors of one length, stacked as ``x`` ``(k, n)``, n >= 1.

    The device road of :func:`_chunk_stats` along dim 1: every pass runs once for all k tensors, with no host
    read, exact over each row's finite entries. Dead features are not counted (NaN).
    """
    n = x.shape[1]
    x = x.to(torch.float32)  # (k, n); statistics of the float32 values
    signed = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # (k, n) finite entries, 0 elsewhere
    fill = torch.ne(signed, x).to(torch.float32)  # (k, n) 1.0 where the entry was NaN or ±Inf
    nonfinite = fill.sum(1)  # (k,)
    mag = signed.abs()  # (k, n)
    total = signed.sum(1)
    count = (n - nonfinite).clamp_min(1.0)
    mean = total / count  # (k,)
    signed.addcmul_(fill, mean[:, None])  # non-finite slots become the row's mean
    lo, hi = signed.amin(1), signed.amax(1)
    absmax = torch.maximum(hi, -lo)
    scale = torch.exp2(-torch.floor(torch.log2(absmax.clamp_min(_TINY))))  # (k,) max |x| * scale in [1, 2)
    dev = torch.addcmul((-mean * scale)[:, None], signed, scale[:, None])  # (k, n) (x - mean) * scale
    drift = dev.sum(1)
    dev_norm = ((dev * dev).sum(1) - drift * drift / count).clamp_min(0.0).sqrt() / scale
    zero = torch.le(mag, eps).to(torch.float32).sum(1) - nonfinite
    saturated = torch.gt(mag, saturation).to(torch.float32).sum(1)
    dead = torch.full_like(total, math.nan)
    return torch.stack([nonfinite, total + drift / scale, dev_norm, lo, hi, absmax, zero, saturated, dead], 1)


def _merge_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Merge chunk rows ``(k, RAW_WIDTH)`` on the device (Chan's parallel variance), no host read.

    The merge runs in float64 where the device has it (not MPS), so only each chunk's own float32 mean
    limits the accuracy: relative std error ~1e-4 at |mean|/std ~ 1e6, for tensors over one chunk.
    """
    wide = torch.float32 if rows.device.type == "mps" else torch.float64
    rows = rows.to(wide)
    n = torch.tensor(counts, dtype=wide, device=rows.device)  # (k,)
    nonfinite = rows[:, _IDX["nonfinite"]]
    finite = n - nonfinite
    total = rows[:, _IDX["sum"]]
    all_finite = finite.sum().clamp_min(1.0)
    mean = total.sum() / all_finite
    chunk_mean = total / finite.clamp_min(1.0)
    m2 = (rows[:, _IDX["dev_norm"]] ** 2).sum() + (finite * (chunk_mean - mean) ** 2).sum()
    has = finite > 0  # chunks with at least one finite entry decide min / max
    lo = torch.where(has, rows[:, _IDX["min"]], math.inf).min()
    hi = torch.where(has, rows[:, _IDX["max"]], -math.inf).max()
    return torch.stack([
        nonfinite.sum(), total.sum(), m2.sqrt(), lo, hi, rows[:, _IDX["absmax"]].max(),
        rows[:, _IDX["zero"]].sum(), rows[:, _IDX["saturated"]].sum(), rows[:, _IDX["dead"]].max(),
    ]).to(torch.float32)


@dataclass(frozen=True)
class Stats:
    """Published statistics of one tensor (host side, plain floats)."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    absmax: float
    norm: float
    zero_fraction: float
    saturation_fraction: float
    nonfinite: int
    dead_features: float
    features: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)  # the fields, declared in STAT_COLUMNS order (a test checks it)


def finalize(raw: np.ndarray, count: int, features: int = 0) -> Stats:
    """Turn one raw row (from :func:`tensor_stats`, on the host) into published statistics.

    ``count`` is the tensor's element count; ``features`` its last-dimension size when dead features were
    counted. Fractions are of the finite entries; with no finite entry every statistic is NaN.
    """
    raw = np.asarray(raw, dtype=np.float64)
    nonfinite = round(float(raw[_IDX["nonfinite"]])) if count else 0
    finite = count - nonfinite
    if finite <= 0:
        nan = math.nan
        return Stats(count, nan, nan, nan, nan, nan, nan, nan, nan, nonfinite, nan, features)
    total, m2 = float(raw[_IDX["sum"]]), float(raw[_IDX["dev_norm"]]) ** 2
    mean = total / finite
    std = math.sqrt(m2 / (finite - 1)) if finite > 1 else 0.0
    sumsq = m2 + finite * mean * mean
    dead = float(raw[_IDX["dead"]])
    return Stats(
        count=count,
        mean=mean,
        std=std,
        min=float(raw[_IDX["min"]]),
        max=float(raw[_IDX["max"]]),
        absmax=float(raw[_IDX["absmax"]]),
        norm=math.sqrt(max(sumsq, 0.0)),
        zero_fraction=float(raw[_IDX["zero"]]) / finite,
        saturation_fraction=float(raw[_IDX["saturated"]]) / finite,
        nonfinite=nonfinite,
        dead_features=dead,
        features=features,
    )


def _fused(x: torch.Tensor, eps: float, saturation: float, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same raw row as :func:`tensor_stats`, written for ``torch.compile`` to fuse into ~2 reads of x."""
    x = x.reshape(-1, width).to(torch.float32)  # (R, C)
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, 0.0)
    # count the non-finite entries, not the finite ones: a float32 count of 2^24 or more finite entries is
    # rounded, and numel - that would report a few NaN/Inf in a finite tensor
    nonfinite = (~finite).sum(dtype=torch.float32)
    count = (x.numel() - nonfinite).clamp_min(1.0)
    total = clean.sum()
    mean = total / count
    mag = clean.abs()
    per_feature = mag.amax(0)  # (C,)
    absmax = per_feature.amax()
    scale = torch.exp2(-torch.floor(torch.log2(absmax.clamp_min(_TINY))))  # as on the eager device road
    dev = torch.where(finite, (x - mean) * scale, 0.0)
    drift = dev.sum()
    dev_norm = ((dev * dev).sum() - drift * drift / count).clamp_min(0.0).sqrt() / scale
    lo = torch.where(finite, x, math.inf).amin()
    hi = torch.where(finite, x, -math.inf).amax()
    zero = ((mag <= eps) & finite).sum(dtype=torch.float32)
    saturated = (mag > saturation).sum(dtype=torch.float32)
    dead = (per_feature <= eps).sum(dtype=torch.float32)
    row = torch.stack([nonfinite, total + drift / scale, dev_norm, lo, hi, absmax, zero, saturated, dead])
    return row, per_feature


class CompiledStats:
    """``torch.compile``'d statistics: the same row as :func:`tensor_stats` in about two reads of the tensor.

    Compiling costs seconds (about 20 s on a 2-core CPU, once per process and dtype), so it is used where it
    pays: by default only for CUDA tensors (``stats.compile: auto``). Any failure to compile or run switches
    back to the eager engine for good, and is reported once through ``on_error``.
    """

    def __init__(self, on_error: Any = None):
        self._fn: Any = None
        self.broken = False
        self._on_error = on_error

    def __call__(
        self, t: torch.Tensor, eps: float, saturation: float, features: bool,
        feature_absmax: list[torch.Tensor] | None, scratch: Scratch | None,
    ) -> torch.Tensor:
        if not self.broken and t.numel() > 0:
            try:
                if self._fn is None:
                    self._fn = torch.compile(_fused, dynamic=True)
                src = t.detach()
                if src.is_complex():
                    src = src.abs()
                width = t.shape[-1] if features and t.dim() >= 2 and t.shape[-1] > 0 else 1
                row, per_feature = self._fn(src, eps, saturation, width)
                if width == 1 and not (features and t.dim() >= 2):
                    row = row.clone()
                    row[_IDX["dead"]] = math.nan
                elif feature_absmax is not None:
                    feature_absmax.append(per_feature)
                return row
            except Exception as exc:  # a compiler that fails must not cost the statistics
                self.broken = True
                if self._on_error is not None:
                    self._on_error("compiling the statistics kernel (falling back to eager)", exc)
        return tensor_stats(t, eps, saturation, features=features, feature_absmax=feature_absmax,
                            scratch=scratch)
