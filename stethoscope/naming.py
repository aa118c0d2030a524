"""Module and parameter names as the user's model spells them, and name-pattern selection.

Wrappers add prefixes (``module.`` from DDP/DataParallel, ``_orig_mod.`` from ``torch.compile``,
``_fsdp_wrapped_module.`` from FSDP, ``_checkpoint_wrapped_module.`` from activation checkpointing):
targets in findings never carry them. Selections accept a glob pattern, a list of patterns, or a
predicate ``name -> bool`` (TransformerLens' filter convention).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_WRAPPER_PARTS = {p.rstrip(".") for p in WRAPPER_PREFIXES}

Selector = str | Iterable[str] | Callable[[str], bool] | None


def clean_name(name: str) -> str:
    """Strip wrapper components anywhere in a dotted name (``module._orig_mod.h.0`` -> ``h.0``)."""
    if not name:
        return name
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    return ".".join(parts)


def make_filter(selector: Selector) -> Callable[[str], bool]:
    """Turn a glob, a list of globs, or a predicate into a predicate over cleaned names.

    ``None`` and ``"*"`` select everything; ``""`` and ``[]`` select nothing. A list selects a name when any
    of its patterns matches; a pattern with no glob characters also matches the name exactly.
    """
    if selector is None:
        return lambda name: True
    if callable(selector):
        return selector
    if isinstance(selector, str):
        selector = [selector]
    pats = [p for p in selector if p != ""]
    if not pats:
        return lambda name: False
    if "*" in pats:
        return lambda name: True
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)


def patterns(value: str | list[str]) -> list[str]:
    """A pattern option as a list; '' (or an empty list) means none."""
    if isinstance(value, str):
        return [] if value == "" else [value]
    return [v for v in value if v != ""]
