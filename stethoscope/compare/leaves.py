"""Every tensor inside a module's inputs or outputs, by path, so two models' structures can be laid side by side.

Unlike :func:`stethoscope.flatten.iter_float_tensors` (statistics want floating tensors only), a comparison
wants every tensor leaf: integer position ids and boolean masks that differ are differences too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

_MAX_DEPTH = 8


def tensor_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in ``obj`` (tuples, lists, dicts, ``ModelOutput``, dataclasses);
    ``path`` is ``""`` for a bare tensor, else dotted (``"0"``, ``"logits"``, ``"past_key_values.1.0"``)."""
    yield from _walk(obj, prefix, 0, set())


def _walk(obj: Any, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if obj is None or isinstance(obj, str | bytes | int | float | bool) or depth >= _MAX_DEPTH or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Mapping):  # dict, OrderedDict, transformers.ModelOutput
        items = [(str(k), v) for k, v in list(obj.items())]
    elif isinstance(obj, list | tuple):
        items = [(str(i), v) for i, v in enumerate(obj)]
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj)]
    else:  # caches (DynamicCache) and other objects: not compared
        return
    for key, value in items:
        yield from _walk(value, f"{path}.{key}" if path else key, depth + 1, seen)


def input_leaves(args: tuple, kwargs: dict | None) -> list[tuple[str, torch.Tensor]]:
    """The tensors a module was called with: positional ones as ``args.0``, keyword ones by name."""
    out = list(tensor_leaves(args, "args"))
    if kwargs:
        out += list(tensor_leaves(dict(kwargs), ""))
    return out


def dims(t: torch.Tensor) -> str:
    """``(2, 5, 64)``."""
    return f"({', '.join(str(s) for s in t.shape)})"


def shape_of(t: torch.Tensor | None) -> str:
    """``(2, 5, 64) float32`` for messages and tables; ``none`` for a missing leaf."""
    if t is None:
        return "none"
    return f"{dims(t)} {str(t.dtype).replace('torch.', '')}"
