"""When two tensors "agree": a tolerance set by the lower precision of the two dtypes.

The same model run in fp32 and in bf16 cannot agree to fp32's resolution, and judging an fp32 pair at bf16's
resolution would hide real bugs. So every pair of tensors is judged at the resolution of the *less* precise
of its two dtypes, ``eps = torch.finfo(dtype).eps`` (float64 2.2e-16, float32 1.19e-7, float16 9.77e-4,
bfloat16 7.81e-3):

* ``rel = ||b - a||_2 / max(||a||_2, ||b||_2)``, the whole tensor's relative error, computed in float64
  (0 when both are zero; NaN and ±Inf in the same places of both count as equal);
* the pair **differs** when ``rel > factor * eps`` (``factor`` = :data:`DEFAULT_FACTOR` = 8: float32 9.5e-7,
  float16 7.8e-3, bfloat16 0.0625), when NaN / Inf sit in different places, or when an integer or bool
  tensor differs anywhere.

Why a whole-tensor norm and a factor of 8: one rounding costs up to eps/2 per element, and a healthy tiny
GPT-2 / Llama / BERT run in bf16 against fp32 shows ``rel`` up to 1.3 eps after four layers (docs/compare.md);
a norm-wise error does not flag the lone element near zero whose own relative error is large.
``share`` (the share of differing elements) uses the element-wise form of the same test,
``|b - a| > factor * eps * (|a| + rms(a))``, so elements near zero are judged against the tensor's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_FACTOR = 8.0


def resolution(dtype_a: torch.dtype, dtype_b: torch.dtype) -> float:
    """``finfo(dtype).eps`` of the less precise floating dtype of the two (0 for integer / bool pairs)."""
    eps = [torch.finfo(d).eps for d in (dtype_a, dtype_b) if d.is_floating_point or d.is_complex]
    return float(max(eps)) if eps else 0.0


def lower_dtype(dtype_a: torch.dtype, dtype_b: torch.dtype) -> torch.dtype:
    """The less precise of two dtypes (the one whose resolution the pair is judged at)."""
    def eps(d: torch.dtype) -> float:
        return torch.finfo(d).eps if (d.is_floating_point or d.is_complex) else 0.0
    return dtype_a if eps(dtype_a) >= eps(dtype_b) else dtype_b


@dataclass
class PairError:
    """How far one tensor of model B lies from the matching tensor of model A."""

    rel: float  # ||b - a|| / max(||a||, ||b||); inf when NaN/Inf positions differ
    max_abs: float  # max |b - a| over finite pairs
    max_rel: float  # max |b - a| / max |a| (relative to the tensor's scale)
    share: float  # share of elements that differ (element-wise test, see the module docstring)
    tol: float  # factor * eps of the lower dtype (0: exact comparison)
    numel: int

    @property
    def differs(self) -> bool:
        return self.rel > self.tol


def pair_error(a: torch.Tensor, b: torch.Tensor, factor: float = DEFAULT_FACTOR) -> PairError:
    """Compare two tensors of equal shape at the lower dtype's resolution (see the module docstring)."""
    eps = resolution(a.dtype, b.dtype)
    tol = factor * eps
    n = a.numel()
    if n == 0:
        return PairError(0.0, 0.0, 0.0, 0.0, tol, 0)
    if eps == 0.0:  # integer / bool: exact
        ne = a.to(b.device) != b
        k = int(ne.sum())
        return PairError(float("inf") if k else 0.0, float(k > 0), float(k > 0), k / n, 0.0, n)
    if a.is_complex() or b.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
    x = a.detach().to(device=b.device, dtype=torch.float64)  # (…) the reference
    y = b.detach().to(dtype=torch.float64)  # (…) the candidate
    fx, fy = torch.isfinite(x), torch.isfinite(y)
    both = fx & fy
    bad = int((fx != fy).sum()) if not bool(both.all()) else 0
    if bad == 0 and not bool(both.all()):  # non-finite in the same places: equal only if the same value
        same = (x == y) | (torch.isnan(x) & torch.isnan(y)) | both
        bad = int((~same).sum())
    if bad:
        d = (x - y)[both].abs()
        return PairError(float("inf"), float(d.max()) if d.numel() else float("nan"), float("inf"), bad / n, tol, n)
    if not bool(both.all()):
        x, y = x[both], y[both]
    diff = (y - x).abs()
    nx, ny = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    nd = float(torch.linalg.vector_norm(diff))
    scale = max(nx, ny)
    rel = nd / scale if scale > 0 else 0.0
    amax = float(x.abs().max()) if x.numel() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rms = nx / max(x.numel(), 1) ** 0.5
    share = float((diff > tol * (x.abs() + rms)).sum()) / n if max_abs > 0 else 0.0
    return PairError(rel, max_abs, max_abs / amax if amax > 0 else (0.0 if max_abs == 0 else float("inf")),
                     share, tol, n)


def worst(errors: list[PairError]) -> PairError | None:
    """The leaf that strays furthest (by ``rel / tol``, then ``rel``); None for no leaves."""
    if not errors:
        return None
    return max(errors, key=lambda e: (e.rel / e.tol if e.tol > 0 else (float("inf") if e.rel else 0.0), e.rel))
