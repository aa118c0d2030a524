"""Out-of-memory context: recognise the error, find where it struck, and say what usually helps.

The exception itself is never touched: the monitor re-raises it unchanged after its extensions saw it.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any

import torch

from stethoscope.rules import hints as H

_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "outofmemory")
_REQUEST = re.compile(r"[Tt]ried to allocate ([\d.]+) ?([KMGT]i?B)")
_UNITS = {"KIB": 2**10, "KB": 1e3, "MIB": 2**20, "MB": 1e6, "GIB": 2**30, "GB": 1e9, "TIB": 2**40, "TB": 1e12}


def is_oom(exc: BaseException | None) -> bool:
    """``torch.OutOfMemoryError`` (CUDA), or a RuntimeError saying it ran out of memory (CPU, MPS, XPU)."""
    if exc is None:
        return False
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(t in text for t in _OOM_TEXT)
    return False


def requested_bytes(exc: BaseException) -> int | None:
    """The size of the allocation that failed, when the message says it (``Tried to allocate 2.00 GiB``)."""
    m = _REQUEST.search(str(exc))
    if not m:
        return None
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    except (KeyError, ValueError):
        return None


def where(tb: TracebackType | None, module_names: dict[int, str]) -> tuple[str | None, str]:
    """The innermost module whose ``forward`` was running, and the phase (forward / backward / optimizer).

    ``module_names`` maps ``id(module)`` to its name; frames are read from the traceback only.
    """
    module = None
    phase = "step"
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in frames:
        code = frame.f_code
        path = code.co_filename.replace("\\", "/")
        if "torch/autograd/" in path and code.co_name in ("backward", "_engine_run_backward", "grad"):
            phase = "backward"
        elif "torch/optim/" in path and phase == "step":
            phase = "optimizer step"
        self_obj = frame.f_locals.get("self") if code.co_name == "forward" else None
        if self_obj is not None and id(self_obj) in module_names:
            module = module_names[id(self_obj)]
            phase = "forward"
    return module, phase


def remedies(attn_impl: str | None, fragmented: bool, after_epoch: bool, grew: bool) -> list[str]:
    """The usual fixes, most specific first (the ``memory.oom`` rows of the hints table)."""
    eager = attn_impl == "eager"
    return H.clauses("memory.oom", after_epoch=after_epoch, grew=grew, eager=eager, not_eager=not eager,
                     fragmented=fragmented)


def input_shapes(args: tuple, kwargs: dict, limit: int = 8) -> list[tuple[str, tuple, str]]:
    """``(path, shape, dtype)`` of the tensors handed to a module call: top level, and one level into dicts,
    lists and tuples (a batch dict). No tensor is copied or kept."""
    out: list[tuple[str, tuple, str]] = []

    def add(path: str, v: Any) -> None:
        if len(out) < limit and isinstance(v, torch.Tensor):
            out.append((path, tuple(v.shape), str(v.dtype).replace("torch.", "")))

    for i, v in enumerate(args):
        if isinstance(v, torch.Tensor):
            add(f"args[{i}]", v)
        elif isinstance(v, dict):
            for k, x in v.items():
                add(f"args[{i}][{k!r}]", x)
        elif isinstance(v, list | tuple):
            for j, x in enumerate(v[:limit]):
                add(f"args[{i}][{j}]", x)
        if len(out) >= limit:
            break
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            add(k, v)
        elif isinstance(v, dict):
            for kk, x in v.items():
                add(f"{k}[{kk!r}]", x)
        if len(out) >= limit:
            break
    return out


def shapes_text(shapes: list[tuple[str, tuple, str]]) -> str:
    if not shapes:
        return "(no tensor inputs recorded)"
    return ", ".join(f"{p} {tuple(s)} {d}" for p, s, d in shapes)


def numel_of(shapes: list[tuple[str, tuple, str]]) -> int:
    total = 0
    for _, s, _ in shapes:
        n = 1
        for d in s:
            n *= int(d)
        total += n
    return total
