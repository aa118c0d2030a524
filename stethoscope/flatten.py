"""Walk any module output (tensors, tuples, dicts, dataclasses, ``ModelOutput``, None, ints) to its tensors.

Models return all kinds of structures; a monitor that assumes a tensor breaks the training it watches.
Only floating (and complex) tensors are yielded; integer and bool tensors, Python scalars, strings and
None are skipped. Cycles and absurd nesting are cut off rather than recursed into.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch

from stethoscope.stats import is_summarisable

_MAX_DEPTH = 8


def iter_float_tensors(obj: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every floating tensor inside ``obj``.

    ``path`` is "" for a bare tensor, else a dotted path such as ``"0"``, ``"last_hidden_state"`` or
    ``"attentions.3"``. Order follows the structure (tuple order, dict insertion order, dataclass fields).
    """
    if isinstance(obj, torch.Tensor):  # the common case (a module's output), without the walk
        if is_summarisable(obj):
            yield prefix, obj
        return
    yield from _walk(obj, prefix, 0, set())


def float_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The floating tensors of a call's ``(args, kwargs)``, in the order :func:`iter_float_tensors` gives.

    One positional tensor and no keywords (most module calls) is answered without the walk.
    """
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return [args[0]] if is_summarisable(args[0]) else []
    return [t for _, t in _walk((args, kwargs), "", 0, set())]


def _walk(obj: object, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if is_summarisable(obj):
            yield path, obj
        return
    if obj is None or isinstance(obj, str | bytes | int | float | bool) or depth >= _MAX_DEPTH:
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Mapping):  # dict, OrderedDict, transformers.ModelOutput
        items = list(obj.items())
    elif isinstance(obj, list | tuple):  # includes namedtuples
        items = list(enumerate(obj))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj)]
    else:
        return
    for key, value in items:
        child = f"{path}.{key}" if path else str(key)
        yield from _walk(value, child, depth + 1, seen)


def first_float_tensor(obj: object) -> torch.Tensor | None:
    """The first floating tensor in ``obj`` (the "main" output: hidden states, logits), or None."""
    for _, tensor in iter_float_tensors(obj):
        return tensor
    return None
