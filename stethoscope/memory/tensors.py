"""Live tensors: what is alive now, what accumulates between two moments, and the largest ones.

A snapshot walks ``gc.get_objects()`` once (tenths of a second in a big process, so it is taken only when
the leak test fires, or on an out-of-memory error) and keeps plain data only — never a reference to a
tensor. Tensors are grouped by (shape, dtype, device, what they hold): a parameter, a plain tensor, or a
tensor that holds an autograd graph (its ``grad_fn``). Comparing two snapshots names the groups whose count
grows, which is what a leak looks like from Python.

Tensors saved *inside* an autograd graph (the activations a backward pass needs) are not Python objects,
so they never appear by themselves: they show through the tensor that holds the graph. That is why the
classic retained-graph leak — ``losses.append(loss)`` or ``total_loss += loss`` in a loop where the graph
is never freed by a backward pass — shows up as "one more scalar holding a graph per step" (append) or
"one scalar whose graph grows every step" (``+=``), while the memory it costs is every step's activations.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from stethoscope.rules import hints as H

_GRAPH_WALK_LIMIT = 20_000  # autograd nodes visited per tensor when measuring a graph
_GRAPH_TENSORS_LIMIT = 256  # tensors holding a graph whose graph size is measured per snapshot


@dataclass
class Group:
    """Tensors of one kind in a snapshot."""

    shape: tuple
    dtype: str
    device: str
    holds: str  # "graph:<GradFnName>", "parameter", "requires_grad" or "tensor"
    count: int = 0
    bytes: int = 0

    @property
    def key(self) -> tuple:
        return (self.shape, self.dtype, self.device, self.holds)

    def label(self) -> str:
        shape = "scalar" if self.shape == () else "×".join(str(s) for s in self.shape)
        holds = self.holds
        if holds.startswith("graph:"):
            holds = f"holding an autograd graph ({holds[6:]})"
        return f"{shape} {self.dtype} on {self.device}, {holds}"


@dataclass
class Snapshot:
    """Plain data about the live tensors at one step."""

    step: int | None
    groups: dict[tuple, Group] = field(default_factory=dict)
    largest: list[dict] = field(default_factory=list)  # the biggest tensors, largest first
    graph_sizes: list[int] = field(default_factory=list)  # autograd nodes reachable from graph holders
    tensors: int = 0
    bytes: int = 0  # sum of logical sizes (views counted in full)


def _nbytes(t: torch.Tensor) -> int:
    try:
        if t.is_meta:
            return 0
        return int(t.numel()) * int(t.element_size())
    except Exception:
        return 0


def _holds(t: torch.Tensor) -> str:
    fn = t.grad_fn
    if fn is not None:
        return "graph:" + type(fn).__name__
    if isinstance(t, torch.nn.Parameter):
        return "parameter"
    if t.requires_grad:
        return "requires_grad"
    return "tensor"


def graph_size(fn: Any, limit: int = _GRAPH_WALK_LIMIT) -> int:
    """Autograd nodes reachable from ``fn`` (a ``grad_fn``), counting at most ``limit``."""
    seen: set[int] = set()
    stack = [fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        try:
            stack.extend(nxt for nxt, _ in node.next_functions)
        except Exception:
            continue
    return len(seen)


def _live_tensors() -> list[torch.Tensor]:
    out = []
    with warnings.catch_warnings():  # isinstance() on deprecated module proxies warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    out.append(obj)
            except Exception:  # proxies whose __class__ raises
                continue
    return out


def snapshot(step: int | None = None, largest: int = 10, graphs: bool = True) -> Snapshot:
    """Group every live tensor; keep the ``largest`` biggest; measure graphs held by small tensors."""
    snap = Snapshot(step)
    tensors = _live_tensors()
    try:
        sized = []
        graph_holders = []
        for t in tensors:
            try:
                shape = tuple(t.shape)
                if not all(type(d) is int for d in shape):  # a compiler's fake tensor (symbolic sizes)
                    continue
                g = Group(shape, str(t.dtype).replace("torch.", ""), str(t.device), _holds(t))
                hash(g.key)
            except Exception:
                continue
            n = _nbytes(t)
            group = snap.groups.get(g.key)
            if group is None:
                group = snap.groups[g.key] = g
            group.count += 1
            group.bytes += n
            snap.tensors += 1
            snap.bytes += n
            sized.append((n, g))
            if graphs and t.grad_fn is not None and t.numel() <= 16 and len(graph_holders) < _GRAPH_TENSORS_LIMIT:
                graph_holders.append(t.grad_fn)
        sized.sort(key=lambda item: -item[0])
        snap.largest = [
            {"bytes": n, "shape": list(g.shape), "dtype": g.dtype, "device": g.device, "holds": g.holds}
            for n, g in sized[:largest]
        ]
        snap.graph_sizes = sorted((graph_size(fn) for fn in graph_holders), reverse=True)[:16]
    finally:
        del tensors
    return snap


@dataclass
class Accumulation:
    """What grew between two snapshots, and what it probably is."""

    rows: list[dict]  # groups whose count grew: label, holds, count growth, bytes growth, per step
    cause: str  # one sentence naming what accumulates ("" when nothing was seen)
    hint: str  # the fix for that cause ("" when no cause was recognised)
    pattern: str | None  # "append" (one graph holder more per step), "accumulate" (one graph growing), None


def compare(a: Snapshot, b: Snapshot, steps: int, top: int = 5) -> Accumulation:
    """Name what accumulates between snapshot ``a`` and the later ``b``, ``steps`` steps apart."""
    steps = max(1, int(steps))
    rows = []
    for key, gb in b.groups.items():
        ga = a.groups.get(key)
        dc = gb.count - (ga.count if ga else 0)
        db = gb.bytes - (ga.bytes if ga else 0)
        if dc > 0:
            rows.append(
                {
                    "group": gb.label(),
                    "shape": list(gb.shape),
                    "dtype": gb.dtype,
                    "device": gb.device,
                    "holds": gb.holds,
                    "count_growth": dc,
                    "bytes_growth": db,
                    "per_step": round(dc / steps, 3),
                    "count": gb.count,
                }
            )
    # a group that grows with the steps first (a leak adds the same things every step), then by bytes
    rows.sort(key=lambda r: (-(r["count_growth"] >= steps), -r["bytes_growth"], -r["count_growth"]))
    # the rows shown: the top ones, plus any small graph holder further down (it names the cause)
    roots_below = [r for r in rows[top:] if r["holds"].startswith("graph:") and _numel(r["shape"]) == 1][:1]
    rows = rows[:top] + roots_below
    graph_rows = [r for r in rows if r["holds"].startswith("graph:") and r["count_growth"] >= max(1, steps // 2)]
    # the root of a retained graph is a small tensor (a loss, a metric) kept every step; the big ones that
    # grow with it are the activations its graph saved for backward
    roots = [r for r in graph_rows if _numel(r["shape"]) == 1]
    if roots:
        r = roots[0]
        kept = sum(x["bytes_growth"] for x in graph_rows if x is not r)
        cause = (
            f"{r['count_growth']} more {r['group'].replace(', holding', ' holding')} after {steps} steps "
            f"(about {r['per_step']:g} per step; {r['count']} alive now)"
        )
        if kept > 0:
            cause += f", keeping alive +{kept / 2**20:.1f} MiB of tensors saved in their graphs"
        return Accumulation(rows, cause, H.hint("memory.leak", "append"), "append")
    grown = _graph_growth(a, b)
    if grown is not None and grown >= steps:
        return Accumulation(
            rows,
            f"a tensor's autograd graph grew by {grown} nodes in {steps} steps: one graph chained across steps",
            H.hint("memory.leak", "accumulate"),
            "accumulate",
        )
    if graph_rows:
        r = graph_rows[0]
        return Accumulation(
            rows,
            f"{r['count_growth']} more {r['group'].replace(', holding', ' holding')} after {steps} steps "
            f"(about {r['per_step']:g} per step, +{r['bytes_growth'] / 2**20:.1f} MiB)",
            H.hint("memory.leak", "append"),
            "append",
        )
    small = [r for r in rows if _numel(r["shape"]) <= 16 and r["count_growth"] >= max(1, steps // 2)]
    if small:
        r = small[0]
        return Accumulation(
            rows,
            f"{r['count_growth']} more small tensors of {r['group']} after {steps} steps "
            f"(about {r['per_step']:g} per step; {r['count']} alive now)",
            H.hint("memory.leak", "small"),
            "append",
        )
    if rows:
        r = rows[0]
        return Accumulation(
            rows,
            f"{r['count_growth']} more tensors of {r['group']} after {steps} steps "
            f"(+{r['bytes_growth'] / 2**20:.1f} MiB)",
            "find the container that keeps them (a list or dict filled every step, a cache keyed by step or "
            "by input, a module attribute set in forward) and keep only what you need, as numbers or on the CPU",
            None,
        )
    return Accumulation(rows, "", "", None)


def _numel(shape: list) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _graph_growth(a: Snapshot, b: Snapshot) -> int | None:
    if not b.graph_sizes:
        return None
    before = a.graph_sizes[0] if a.graph_sizes else 0
    return b.graph_sizes[0] - before


def describe_largest(rows: list[dict], limit: int = 10) -> list[str]:
    """The largest tensors as lines ``  512.0 MiB  8×512×50257 float32 on cuda:0, holding a graph (...)``."""
    from stethoscope.memory.readings import mib

    out = []
    for r in rows[:limit]:
        g = Group(tuple(r["shape"]), r["dtype"], r["device"], r["holds"])
        out.append(f"  {mib(r['bytes']):>12s}  {g.label()}")
    return out
