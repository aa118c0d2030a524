"""Trace mode: every module call of a forward pass, as events, a tree and a time profile.

The field note ``rwkv-forward-hang-logs`` adds a print at every stage of ``forward`` to see where it is; trace
mode does that for any model without touching its code::

    with st.Trace(model, path="trace.jsonl") as tr:
        model(**batch)
    st.console.get_console().print(tr.tree(depth=3))

Each module call writes an ``enter`` and an ``exit`` event (name, class, call index, depth, input / output
shapes, dtypes and devices, duration, and with ``stats=True`` a few cheap statistics of each output) to
``trace.jsonl``. :meth:`Trace.tree` folds the calls into an indented tree with a depth limit and a cap on
consecutive calls of one module class, so a 24-layer model prints in a screen. :class:`ModuleProfile` is
the monitor's cheap counterpart: module times on sampled steps only, written to ``profile.json``.

Times are host (wall-clock) times: on a GPU, kernels run asynchronously, so a module's time is its launch
time unless ``sync=True`` synchronises the device at every event (slow, exact).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stethoscope.hooks import HookSet, walk_modules
from stethoscope.rundir import SCHEMA_VERSION

PROFILE = "profile.json"
TRACE = "trace.jsonl"
_MAX_TENSORS = 4  # tensors described per input / output


# ---------------------------------------------------------------------- the monitor's profile
class ModuleProfile:
    """Per-module inclusive and self time, accumulated on sampled steps by the monitor's hooks.

    ``discount(dt)`` removes time spent in stethoscope's own statistics from every module running.
    """

    def __init__(self) -> None:
        self.stack: list[list] = []  # [name, start, child time, discounted time]
        self.total: dict[str, float] = defaultdict(float)
        self.self_time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps = 0

    def enter(self, name: str, t: float) -> None:
        self.stack.append([name, t, 0.0, 0.0])

    def exit(self, name: str, t: float) -> None:
        stack = self.stack
        if not stack:
            return
        if stack[-1][0] != name:  # an exception skipped inner exits: unwind to this module
            for i in range(len(stack) - 1, -1, -1):
                if stack[i][0] == name:
                    del stack[i + 1 :]
                    break
            else:
                return
        _, t0, child, discounted = stack.pop()
        dur = max(0.0, t - t0 - discounted)
        self.total[name] += dur
        self.self_time[name] += max(0.0, dur - child)
        self.calls[name] += 1
        if stack:
            stack[-1][2] += dur

    def discount(self, dt: float) -> None:
        for frame in self.stack:
            frame[3] += dt

    def end_step(self) -> None:
        self.steps += 1
        self.stack.clear()

    def slowest(self, k: int = 10) -> list[dict]:
        """The ``k`` modules with the most self time per sampled step, slowest first."""
        steps = max(self.steps, 1)
        rows = [
            {
                "name": n,
                "self_ms_per_step": 1e3 * s / steps,
                "total_ms_per_step": 1e3 * self.total[n] / steps,
                "calls_per_step": self.calls[n] / steps,
            }
            for n, s in self.self_time.items()
        ]
        rows.sort(key=lambda r: -r["self_ms_per_step"])
        return rows[:k]

    def as_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "sampled_steps": self.steps,
            "note": "host wall-clock time per sampled step; self = without child modules",
            "modules": self.slowest(len(self.self_time)),
        }

    def write(self, run_dir: Path) -> Path:
        from stethoscope.rundir import write_json_atomic

        path = Path(run_dir) / PROFILE
        write_json_atomic(path, self.as_dict())
        return path


# ---------------------------------------------------------------------- trace mode
def describe(obj: Any, limit: int = _MAX_TENSORS) -> list[dict]:
    """Shape, dtype and device of the first ``limit`` tensors inside ``obj`` (any structure, ints too)."""
    out: list[dict] = []

    def walk(o: Any, path: str, depth: int) -> None:
        if len(out) >= limit or depth > 6:
            return
        if isinstance(o, torch.Tensor):
            out.append(
                {
                    "path": path,
                    "shape": list(o.shape),
                    "dtype": str(o.dtype).replace("torch.", ""),
                    "device": str(o.device),
                }
            )
        elif isinstance(o, Mapping):
            with contextlib.suppress(Exception):
                for k, v in o.items():
                    walk(v, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(o, list | tuple):
            for i, v in enumerate(o):
                walk(v, f"{path}.{i}" if path else str(i), depth + 1)

    walk(obj, "", 0)
    return out


def cheap_stats(obj: Any) -> list[dict]:
    """mean, std, abs-max and finiteness of the floating tensors in ``obj`` (one host read each)."""
    from stethoscope.flatten import iter_float_tensors

    out = []
    for path, t in list(iter_float_tensors(obj))[:_MAX_TENSORS]:
        x = t.detach().float()
        if x.numel() == 0:
            continue
        s = x.sum()
        vals = torch.stack(
            [
                s / x.numel(),
                x.std() if x.numel() > 1 else torch.zeros_like(s),
                x.abs().max(),
                torch.isfinite(s).float(),
            ]
        ).tolist()
        out.append(
            {"path": path, "mean": vals[0], "std": vals[1], "absmax": vals[2], "finite": vals[3] == 1.0}
        )
    return out


@dataclass
class Call:
    """One module call: the node of the trace tree."""

    name: str
    cls: str
    call: int
    depth: int
    start: float
    inputs: list[dict]
    end: float | None = None
    outputs: list[dict] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    children: list[Call] = field(default_factory=list)

    @property
    def ms(self) -> float:
        return 1e3 * ((self.end if self.end is not None else time.perf_counter()) - self.start)

    @property
    def self_ms(self) -> float:
        return self.ms - sum(c.ms for c in self.children)


class Trace:
    """Records every module call of ``model`` while active (a context manager).

    Args:
        model: the module whose submodules are traced (all of them, including the model itself).
        path: where ``trace.jsonl`` is written (None: events are kept in memory only).
        stats: add cheap statistics of every output to the exit events (one host read per tensor).
        sync: synchronise CUDA at every event so times are the device's (slow).
    """

    def __init__(
        self, model: nn.Module, path: str | Path | None = None, *, stats: bool = False, sync: bool = False
    ):
        self.model = model
        self.path = Path(path) if path is not None else None
        self.stats = stats
        self.sync = sync and torch.cuda.is_available()
        self.roots: list[Call] = []
        self.events = 0
        self._stack: list[Call] = []
        self._calls: dict[str, int] = defaultdict(int)
        self._hooks = HookSet("trace")
        self._file: Any = None
        self._t0 = 0.0
        self.params: dict[str, int] = {}

    def __enter__(self) -> Trace:
        for name, module in walk_modules(self.model):
            self.params[name] = sum(p.numel() for p in module.parameters())
        self._hooks.on_modules(self.model, lambda name, _m: self._pre(name), lambda name, _m: self._post(name),
                               with_kwargs=True, always_call=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._hooks.remove()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, record: dict) -> None:
        self.events += 1
        if self._file is not None:
            self._file.write(json.dumps({"schema_version": SCHEMA_VERSION, **record}, default=str) + "\n")

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call_index = self._calls[name]
            self._calls[name] = call_index + 1
            node = Call(
                name, type(module).__name__, call_index, len(self._stack), 0.0, describe((args, kwargs))
            )
            (self._stack[-1].children if self._stack else self.roots).append(node)
            self._stack.append(node)
            self._write(
                {
                    "event": "enter",
                    "name": name,
                    "class": node.cls,
                    "call": call_index,
                    "depth": node.depth,
                    "t": round(time.perf_counter() - self._t0, 6),
                    "inputs": node.inputs,
                }
            )
            node.start = self._now()

        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            end = self._now()
            if not self._stack:
                return
            node = self._stack[-1]
            if node.name != name:  # an exception skipped inner exits
                idx = next(
                    (i for i in range(len(self._stack) - 1, -1, -1) if self._stack[i].name == name), None
                )
                if idx is None:
                    return
                node = self._stack[idx]
                del self._stack[idx + 1 :]
            self._stack.pop()
            node.end = end
            node.outputs = describe(output)
            if self.stats:
                with contextlib.suppress(Exception), torch.no_grad():
                    node.stats = cheap_stats(output)
            record = {
                "event": "exit",
                "name": name,
                "class": node.cls,
                "call": node.call,
                "depth": node.depth,
                "t": round(end - self._t0, 6),
                "ms": round(node.ms, 4),
                "outputs": node.outputs,
            }
            if self.stats:
                record["stats"] = node.stats
            self._write(record)

        return hook

    # ------------------------------------------------------------------ summaries
    def all_calls(self) -> list[Call]:
        out: list[Call] = []
        todo = list(reversed(self.roots))
        while todo:
            c = todo.pop()
            out.append(c)
            todo.extend(reversed(c.children))
        return out

    def module_times(self) -> list[dict]:
        """Per module: calls, total and self milliseconds, parameters; most self time first."""
        agg: dict[str, dict] = {}
        for c in self.all_calls():
            row = agg.setdefault(
                c.name,
                {
                    "name": c.name,
                    "class": c.cls,
                    "calls": 0,
                    "ms": 0.0,
                    "self_ms": 0.0,
                    "params": self.params.get(c.name, 0),
                },
            )
            row["calls"] += 1
            row["ms"] += c.ms
            row["self_ms"] += c.self_ms
        return sorted(agg.values(), key=lambda r: -r["self_ms"])

    def tree(self, depth: int = 4, repeats: int = 2) -> Any:
        """A rich ``Tree``: calls nested to ``depth`` levels; runs of more than ``repeats`` consecutive calls
        of one module class are folded into one line (first ``repeats`` and the last are shown)."""
        from rich.tree import Tree

        root = Tree("[bold]forward trace[/]", guide_style="dim")
        self._add(root, self.roots, 0, depth, repeats)
        return root

    def _label(self, c: Call) -> str:
        from rich.markup import escape

        name = escape(c.name or "<model>")
        call = f" #{c.call}" if c.call else ""
        ins = _shapes(c.inputs)
        outs = _shapes(c.outputs)
        params = self.params.get(c.name, 0)
        parts = [f"[bold]{name}[/]{call} [dim]{escape(c.cls)}[/]"]
        if ins or outs:
            parts.append(escape(f"{ins} -> {outs}"))
        parts.append(f"{c.ms:.2f} ms")
        if params:
            parts.append(f"{_count(params)} params")
        if c.stats:
            s = c.stats[0]
            flag = "" if s["finite"] else " [red]non-finite[/]"
            parts.append(f"mean {s['mean']:.3g} std {s['std']:.3g} |max| {s['absmax']:.3g}{flag}")
        return " · ".join(parts)

    def _add(self, parent: Any, calls: list[Call], level: int, depth: int, repeats: int) -> None:
        if level >= depth:
            if calls:
                n = sum(1 for _ in _walk(calls))
                parent.add(f"[dim]… {n} nested call{'s' if n != 1 else ''} below depth {depth}[/]")
            return
        i = 0
        while i < len(calls):
            j = i
            while j + 1 < len(calls) and calls[j + 1].cls == calls[i].cls:
                j += 1
            run = calls[i : j + 1]
            if len(run) > repeats + 1:
                shown = run[:repeats]
                folded = run[repeats:-1]
                for c in shown:
                    self._add(parent.add(self._label(c)), c.children, level + 1, depth, repeats)
                ms = sum(c.ms for c in folded)
                parent.add(
                    f"[dim]… {len(folded)} more {folded[0].cls} calls ({folded[0].name or '<model>'} … "
                    f"{folded[-1].name or '<model>'}), {ms:.2f} ms in all[/]"
                )
                last = run[-1]
                self._add(parent.add(self._label(last)), last.children, level + 1, depth, repeats)
            else:
                for c in run:
                    self._add(parent.add(self._label(c)), c.children, level + 1, depth, repeats)
            i = j + 1


def _walk(calls: list[Call]):
    for c in calls:
        yield c
        yield from _walk(c.children)


def _shapes(items: list[dict]) -> str:
    if not items:
        return ""
    text = ", ".join(f"{d['dtype']}[{','.join(map(str, d['shape']))}]" for d in items)
    return text if len(items) == 1 else f"({text})"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)
