"""Taps: which tensor of which module a layer spec means, and how to take it from a forward pass.

A layer spec names a module and, optionally, what to take from it and how to reduce it::

    NAME[:SOURCE ACCESSORS][@POOLING[,POOLING...]]

    encoder_block_03                      the block's output (its first floating tensor), pooled
    lstm:output[1][0]                     an LSTM's final state h_n: (num_layers * dirs, B, H)
    lstm:output[1][0][-1]                 the top layer's h_n: (B, H)
    lstm.layers.1                         layer 1 of a multi-layer RNN, run exactly (recurrent.py)
    lstm.layers.1:output[1][0]            that layer's h_n
    proj:input[0]                         what goes *into* ``proj`` (its first positional argument)
    encoder.layer.2.attention:output[0]@first,last    a sub-module's output at [CLS] and the last token
    pooler:output                         the same as ``pooler``, written out
    :output.pooler_output                 the model itself (empty name): a ModelOutput attribute / dataclass
                                          field; ['key'] for a dict key

``NAME`` is an alias or a module name; ``SOURCE`` is ``output`` (default) or ``input`` (the positional
arguments; a string key or attribute reads a keyword argument); accessors are ``[int]`` (a tuple / list
index, or an index along a tensor's first axis), ``['key']`` and ``.name``. ``@`` overrides the
representation's pooling for this layer.

This module is pure Python at import: the config validates specs (and pooling names) without torch.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from stethoscope.probe.errors import ProbeLayerError, ProbeModelError

POOLINGS = ("mean", "std", "mean_std", "max", "first", "last")
"""What a spec's ``@`` and a representation's ``pooling`` may name (computed in pooling.py): ``mean``,
``std`` (population), ``mean_std`` (both, twice the width), ``max`` (per feature), and the selections
``first`` (first valid step: a [CLS] token) and ``last`` (last valid step: the last non-padding token, a
recurrent encoder's final frame)."""

_SPEC = re.compile(r"^(?P<name>[^:@]*?)(?::(?P<sel>[^@]*))?(?:@(?P<pool>[^@]+))?$")
_SOURCE = re.compile(r"^(?P<source>output|input)(?P<rest>(?:[\[.].*)?)$")
_ACCESSOR = re.compile(r"\[(?P<idx>-?\d+)\]|\[(?P<key>'[^']*'|\"[^\"]*\")\]|\.(?P<attr>[A-Za-z_]\w*)")
_RNN_LAYER = re.compile(r"^(?P<module>.+)\.layers\.(?P<k>\d+)$")


@dataclass(frozen=True)
class Tap:
    """A parsed layer spec.

    Attributes:
        name: the alias or module name as written (``resolve`` in features.py swaps in the module name).
        source: ``output`` or ``input``.
        path: accessors, each ``("index", int)``, ``("key", str)`` or ``("attr", str)``.
        poolings: the ``@`` override, or None for the representation's pooling.
        explicit: whether the spec had a ``:selector`` (else the default tensor of the output is taken).
    """

    name: str
    source: str = "output"
    path: tuple[tuple[str, Any], ...] = ()
    poolings: tuple[str, ...] | None = None
    explicit: bool = False

    def with_name(self, name: str) -> Tap:
        return dataclasses.replace(self, name=name)

    @property
    def selector(self) -> str:
        """``output[1][0]``-style text of the source and accessors ('' for the default)."""
        if not self.explicit:
            return ""
        return self.source + "".join(_accessor_text(a) for a in self.path)

    def __str__(self) -> str:
        text = self.name + (f":{self.selector}" if self.explicit else "")
        return text + (f"@{','.join(self.poolings)}" if self.poolings else "")


def _accessor_text(acc: tuple[str, Any]) -> str:
    kind, value = acc
    if kind == "index":
        return f"[{value}]"
    if kind == "key":
        return f"[{value!r}]"
    return f".{value}"


def parse_tap(spec: str) -> Tap:
    """Parse a layer spec (see the module docstring).

    Raises:
        ProbeLayerError: a malformed spec, saying which part is wrong and showing the syntax.
    """
    syntax = (
        "NAME[:output|input[ACCESSORS]][@POOLING,...], e.g. 'lstm:output[1][0]' or 'encoder_block_03@first'"
    )
    text = str(spec).strip()
    m = _SPEC.match(text)
    if not m or not (m.group("name").strip() or m.group("sel") is not None):  # '' is the model itself
        raise ProbeLayerError(f"layer spec {spec!r} is malformed; write {syntax}")
    name, sel, pool = m.group("name").strip(), m.group("sel"), m.group("pool")
    source, path, explicit = "output", (), sel is not None
    if sel is not None:
        sm = _SOURCE.match(sel.strip())
        if not sm:
            raise ProbeLayerError(
                f"layer spec {spec!r}: after ':' comes 'output' or 'input' (then accessors such as [1], "
                f"['key'] or .field), not {sel!r}"
            )
        source, rest = sm.group("source"), sm.group("rest")
        accessors, pos = [], 0
        while pos < len(rest):
            am = _ACCESSOR.match(rest, pos)
            if not am:
                raise ProbeLayerError(
                    f"layer spec {spec!r}: cannot read accessor {rest[pos:]!r}; use [int], ['key'] or .name"
                )
            if am.group("idx") is not None:
                accessors.append(("index", int(am.group("idx"))))
            elif am.group("key") is not None:
                accessors.append(("key", ast.literal_eval(am.group("key"))))
            else:
                accessors.append(("attr", am.group("attr")))
            pos = am.end()
        path = tuple(accessors)
    poolings = None
    if pool is not None:
        poolings = tuple(p.strip() for p in pool.split(",") if p.strip())
        bad = [p for p in poolings if p not in POOLINGS]
        if bad or not poolings:
            raise ProbeLayerError(
                f"layer spec {spec!r}: unknown pooling {', '.join(map(repr, bad)) or repr(pool)} after '@'; "
                f"choose from {', '.join(POOLINGS)}"
            )
    return Tap(name, source, path, poolings, explicit)


def rnn_layer_of(name: str) -> tuple[str, int] | None:
    """``("lstm", 1)`` for ``lstm.layers.1``: a candidate per-layer name of a multi-layer RNN."""
    m = _RNN_LAYER.match(name)
    return (m.group("module"), int(m.group("k"))) if m else None


# --- taking a tap's value from a forward pass ------------------------------------------------------


class Inputs:
    """A module call's inputs, read by ``input`` taps: ints index the positional arguments, names the
    keyword arguments."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = tuple(args), dict(kwargs or {})


def _is_packed(obj: Any) -> bool:
    return type(obj).__name__ == "PackedSequence" and hasattr(obj, "batch_sizes")


def _is_tensor(obj: Any) -> bool:
    return (
        type(obj).__module__.startswith("torch")
        and hasattr(obj, "is_floating_point")
        and hasattr(obj, "shape")
    )


def default_value(obj: Any) -> Any:
    """The hidden state in an output when the spec does not say: a packed sequence, a floating tensor, the
    first of a tuple, ``last_hidden_state`` of a dict / ``ModelOutput``, the first field of a dataclass."""
    if _is_packed(obj):
        return obj
    if _is_tensor(obj):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, Inputs):
        return default_value((*obj.args, *obj.kwargs.values()))
    if isinstance(obj, dict) or hasattr(obj, "keys"):
        if "last_hidden_state" in obj:
            return default_value(obj["last_hidden_state"])
        for v in obj.values():
            t = default_value(v)
            if t is not None:
                return t
        return None
    if isinstance(obj, tuple | list):
        for v in obj:
            t = default_value(v)
            if t is not None:
                return t
        return None
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            t = default_value(getattr(obj, f.name))
            if t is not None:
                return t
    return None


def select(obj: Any, tap: Tap, where: str) -> Any:
    """Follow ``tap.path`` from ``obj`` (an output, or :class:`Inputs`); a default pick without a path.

    Raises:
        ProbeModelError: an accessor that does not fit, naming the tap and listing what the output holds.
    """
    if not tap.path:
        value = default_value(obj)
        if value is None:
            raise ProbeModelError(
                f"layer {where!r} ({tap}): the module's {tap.source} holds no floating tensor to probe; "
                f"it holds {structure(obj, tap.source)}. Pick a tensor with a path, or another module"
            )
        return value
    current, done = obj, tap.source
    for acc in tap.path:
        nxt = _step(current, acc)
        if nxt is _MISSING:
            raise ProbeModelError(
                f"layer {where!r} ({tap}): {done} has no {_accessor_text(acc)}; "
                f"{done} is {structure(current, done)}"
            )
        current, done = nxt, done + _accessor_text(acc)
    if not (_is_packed(current) or (_is_tensor(current) and current.is_floating_point())):
        raise ProbeModelError(
            f"layer {where!r} ({tap}): {done} is not a floating tensor but {structure(current, done)}; "
            "extend the path to one"
        )
    return current


_MISSING = object()


def _step(obj: Any, acc: tuple[str, Any]) -> Any:
    kind, value = acc
    if isinstance(obj, Inputs):
        if kind == "index":
            return obj.args[value] if -len(obj.args) <= value < len(obj.args) else _MISSING
        return obj.kwargs.get(value, _MISSING)
    if kind == "index":
        if _is_tensor(obj):
            return obj[value] if obj.dim() > 0 and -obj.shape[0] <= value < obj.shape[0] else _MISSING
        if hasattr(obj, "to_tuple"):  # a transformers ModelOutput: index over its set fields
            obj = obj.to_tuple()
        if isinstance(obj, tuple | list):
            return obj[value] if -len(obj) <= value < len(obj) else _MISSING
        return _MISSING
    if kind == "key" or (kind == "attr" and isinstance(obj, dict)):
        if isinstance(obj, dict) or hasattr(obj, "keys"):
            return obj.get(value, _MISSING)
        if kind == "key":
            return _MISSING
    if _is_packed(obj) or _is_tensor(obj):
        return _MISSING  # tensor methods are not outputs
    return getattr(obj, value, _MISSING)


def structure(obj: Any, prefix: str, limit: int = 12) -> str:
    """What an output holds, leaf by leaf with the path that reaches it: ``output[0]: Tensor(4, 7, 6), ...``."""
    leaves: list[str] = []
    _leaves(obj, prefix, leaves, depth=0)
    more = len(leaves) - limit
    text = "; ".join(leaves[:limit]) + (f"; ... ({more} more)" if more > 0 else "")
    return text or f"{type(obj).__name__} (nothing inside)"


def _leaves(obj: Any, prefix: str, out: list[str], depth: int) -> None:
    if len(out) > 50:
        return
    if _is_packed(obj):
        out.append(f"{prefix}: PackedSequence(data {tuple(obj.data.shape)}, batch {int(obj.batch_sizes[0])})")
    elif _is_tensor(obj):
        out.append(f"{prefix}: Tensor{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}")
    elif depth > 4:
        out.append(f"{prefix}: {type(obj).__name__}")
    elif isinstance(obj, Inputs):
        for i, v in enumerate(obj.args):
            _leaves(v, f"{prefix}[{i}]", out, depth + 1)
        for k, v in obj.kwargs.items():
            _leaves(v, f"{prefix}[{k!r}]", out, depth + 1)
        if not obj.args and not obj.kwargs:
            out.append(f"{prefix}: no arguments")
    elif isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "items")):
        for k, v in obj.items():
            _leaves(v, f"{prefix}[{k!r}]", out, depth + 1)
    elif isinstance(obj, tuple | list):
        for i, v in enumerate(obj):
            _leaves(v, f"{prefix}[{i}]", out, depth + 1)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _leaves(getattr(obj, f.name), f"{prefix}.{f.name}", out, depth + 1)
    else:
        out.append(f"{prefix}: {type(obj).__name__}")
