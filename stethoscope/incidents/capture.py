"""What an incident folder holds, and how it is written and read back: the batch, RNG states, weights.

During a step the incident extension only keeps *references* to what the model's forward received (no copy,
no device transfer); this module turns them into files when an incident opens, and back into objects for
``stethoscope replay``:

* ``batch.pt`` — every root forward call of the step as ``{"args": [...], "kwargs": {...}}``: tensors (moved
  to the CPU), lists, tuples, dicts and plain values (numbers, strings, booleans, None). Anything else is
  replaced by ``{"__unsaved__": type name}`` and listed in the manifest. Past ``max_bytes`` every tensor keeps
  only its first ``rows`` rows along dim 0 (the same ``rows`` for all, the most that fit; 0 = shapes only).
* ``rng.pt`` — the RNG states read just before each forward call (torch CPU, every initialised CUDA device,
  Python's ``random``, NumPy's global generator when NumPy is loaded).
* ``weights.pt`` — a ``state_dict`` on the CPU (see the extension for *which* weights: before or after the
  optimizer's step).

Everything is loaded with ``torch.load(weights_only=True)``: an incident folder runs no code when read.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stethoscope.errors import StethoscopeError

BATCH = "batch.pt"
RNG = "rng.pt"
WEIGHTS = "weights.pt"
MANIFEST = "manifest.json"
SKIP_BATCHES = "skip_batches.json"
_PLAIN = (int, float, bool, str, bytes, type(None))
_MAX_DEPTH = 8


class IncidentError(StethoscopeError, ValueError):
    """An incident folder is missing, incomplete, or cannot be replayed with what was given."""


@dataclass
class ForwardCall:
    """One call of the root module's forward in a step: references to its inputs (not copies) and the RNG
    states just before it (what dropout will draw)."""

    args: tuple
    kwargs: dict
    rng: dict
    training: bool


@dataclass
class StepInputs:
    """What one step gave the model: its forward calls, and (filled by the extension) data indices and a
    pre-update weight snapshot."""

    step: int
    calls: list[ForwardCall] = field(default_factory=list)
    dropped_calls: int = 0  # calls past the cap, not kept
    indices: list = field(default_factory=list)  # one entry per loader batch consumed in the step
    weights: dict | None = None  # state_dict on the CPU, taken before the optimizer's step
    grad_norm: float | None = None  # the total gradient norm read at the optimizer's step pre-hook
    grad_spike: bool = False  # that norm was non-finite or far above its running median
    stepped: bool = False  # the optimizer's step ran inside this step


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG a forward may draw from, as it is now (cheap: a few KiB copied on the host, no device sync)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    state["python"] = _python_state(random.getstate())
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def _python_state(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def set_rng_state(state: dict) -> list[str]:
    """Restore what :func:`rng_state` read; returns the generators restored."""
    done = []
    if "torch" in state:
        torch.set_rng_state(state["torch"])
        done.append("torch")
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
        done.append("cuda")
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
        done.append("python")
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            s = state["numpy"]
            np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                                 s["gauss"]))
            done.append("numpy")
    return done


# ---------------------------------------------------------------------- the batch
def _tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > _MAX_DEPTH:
        return []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v, depth + 1)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v, depth + 1)]
    return []


def _nbytes(t: torch.Tensor, rows: int | None = None) -> int:
    if rows is None or t.dim() == 0:
        return t.numel() * t.element_size()
    per_row = (t.numel() // t.shape[0] if t.shape[0] else 0) * t.element_size()
    return min(rows, t.shape[0]) * per_row


def rows_that_fit(tensors: list[torch.Tensor], max_bytes: int) -> int | None:
    """None when everything fits; else the most leading rows (dim 0) every tensor can keep within
    ``max_bytes`` (0-dim tensors are always kept whole), 0 when not even one row fits."""
    if sum(_nbytes(t) for t in tensors) <= max_bytes:
        return None
    lo, hi = 0, max((t.shape[0] for t in tensors if t.dim() > 0), default=0)
    while lo < hi:  # the largest r with size(r) <= max_bytes
        mid = (lo + hi + 1) // 2
        if sum(_nbytes(t, mid) for t in tensors) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _pack(obj: Any, rows: int | None, described: list, unsaved: list, path: str, depth: int = 0) -> Any:
    """``obj`` with its tensors detached on the CPU (cut to ``rows``), containers rebuilt as plain ones."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        full = list(t.shape)
        if rows is not None and t.dim() > 0:
            t = t[:rows]
        described.append({"path": path, "shape": full, "saved_shape": list(t.shape),
                          "dtype": str(t.dtype).replace("torch.", ""), "device": str(obj.device)})
        return t.to("cpu", copy=True).contiguous()  # (rows, ...) on the host: never a view of a big storage
    if isinstance(obj, _PLAIN):
        return obj
    if depth <= _MAX_DEPTH and isinstance(obj, Mapping):
        return {str(k): _pack(v, rows, described, unsaved, f"{path}.{k}", depth + 1) for k, v in obj.items()}
    if depth <= _MAX_DEPTH and isinstance(obj, list | tuple):
        packed = [_pack(v, rows, described, unsaved, f"{path}.{i}", depth + 1) for i, v in enumerate(obj)]
        return packed if isinstance(obj, list) else tuple(packed)
    unsaved.append({"path": path, "type": type(obj).__name__})
    return {"__unsaved__": type(obj).__name__}


def save_batch(calls: list[ForwardCall], folder: Path, max_bytes: int) -> dict:
    """Write ``batch.pt`` and ``rng.pt``; returns the manifest's ``batch`` section (what was and was not
    saved)."""
    tensors = [t for c in calls for t in _tensors((c.args, c.kwargs))]
    rows = rows_that_fit(tensors, max_bytes)
    described: list[dict] = []
    unsaved: list[dict] = []
    packed = [{"args": list(_pack(list(c.args), rows, described, unsaved, f"call{i}.args")),
               "kwargs": _pack(dict(c.kwargs), rows, described, unsaved, f"call{i}.kwargs"),
               "training": c.training}
              for i, c in enumerate(calls)]
    torch.save(packed, folder / BATCH)
    torch.save([c.rng for c in calls], folder / RNG)
    full = sum(_nbytes(t) for t in tensors)
    return {
        "file": BATCH,
        "calls": len(calls),
        "complete": rows is None and not unsaved,
        "rows_kept": rows,  # None: every row of every tensor
        "bytes_full": full,
        "bytes_saved": full if rows is None else sum(_nbytes(t, rows) for t in tensors),
        "max_bytes": max_bytes,
        "tensors": described,
        "unsaved": unsaved,
    }


def load_batch(folder: Path) -> tuple[list[dict], list[dict]]:
    """(calls, rng states) as :func:`save_batch` wrote them."""
    for name in (BATCH, RNG):
        if not (folder / name).is_file():
            raise IncidentError(f"{str(folder / name)!r} is missing: this incident folder has no saved batch; "
                                "it cannot be replayed (was the capture cut short? see its manifest.json)")
    calls = torch.load(folder / BATCH, map_location="cpu", weights_only=True)
    rngs = torch.load(folder / RNG, map_location="cpu", weights_only=True)
    return calls, rngs


# ---------------------------------------------------------------------- weights
def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` copied to the CPU (the copy the optimizer cannot change any more)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def state_bytes(model: torch.nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with its tensors moved to ``device`` (containers rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [to_device(v, device) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj
