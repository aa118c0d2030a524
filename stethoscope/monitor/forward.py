"""The monitor's forward hooks: the heartbeat on every step, activation statistics on sampled ones.

Every module gets a pre-hook and a post-hook (through the monitor's :class:`~stethoscope.hooks.HookSet`).
On every step they stamp the heartbeat (a list append and a clock read: what the hang watchdog reads).
On sampled steps, for the modules ``stats.modules`` selects, they queue device rows on the step collector:

* the output's statistics, one row per floating tensor of the (possibly nested) output;
* the inputs of linear layers (what a dead-feature check on a projection needs);
* whether the inputs were finite, as one device scalar per call (0 when every entry is finite), so
  ``numerics.nonfinite`` can tell the module that *made* a NaN from the ones that passed it on. An input
  that is the output of a watched module (the usual case: a hidden state) reuses that output's exact
  non-finite count; any other input is read once for its extremes (NaN and ±Inf show in them). Not a sum:
  a float32 sum of finite entries overflows to inf once they reach ~1e38 in total (a residual stream at
  1e37), which proves nothing about any entry.

Nothing here reads a value back from the device.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stethoscope.collector import Entry, StepCollector
from stethoscope.flatten import float_inputs, iter_float_tensors
from stethoscope.heartbeat import Heartbeat
from stethoscope.hooks import HookSet, is_compiling
from stethoscope.monitor.engine import StatsEngine, tensor_key
from stethoscope.naming import make_filter

LINEAR_TYPES = ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear", "LazyLinear", "Bilinear")

Guard = Callable[..., Any]  # guard(where, fn, *args): run fn, an exception becomes a monitor.error finding


def _in_checkpoint() -> bool:
    """True when called from inside ``torch.utils.checkpoint`` (a reentrant checkpoint's no-grad forward)."""
    frame = sys._getframe(2)
    for _ in range(64):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(("utils/checkpoint.py", "utils\\checkpoint.py")):
            return True
        frame = frame.f_back
    return False


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a forward called now is a checkpoint's recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class ForwardObserver:
    """Hook bodies for module forwards and the per-step state they keep (see the module docstring).

    ``sampling`` is switched by the monitor: True inside a sampled step that is not paused.
    """

    def __init__(self, heartbeat: Heartbeat, engine: StatsEngine, collector: StepCollector, per_call: bool,
                 guard: Guard, profile: Any = None):
        self.heartbeat = heartbeat
        self.engine = engine
        self.collector = collector
        self.per_call = per_call
        self.guard = guard
        self.profile = profile  # ModuleProfile (trace.profile) or None
        self.sampling = False
        self.calls: dict[str, int] = {}
        self.sums: dict[tuple, tuple[Any, torch.Tensor]] = {}  # finiteness flags of the step, per tensor
        self.input_flags: dict[str, list[torch.Tensor | None]] = {}
        self.no_grad: set[str] = set()
        self.recomputed: set[str] = set()

    def attach(self, hooks: HookSet, model: nn.Module, module_patterns: Any) -> None:
        """Hook every module of ``model`` once; statistics for the names ``module_patterns`` selects."""
        wants = make_filter(module_patterns)

        def pre(name: str, module: nn.Module) -> Callable:
            is_linear = type(module).__name__ in LINEAR_TYPES or isinstance(module, nn.Linear)
            return self._make_pre_hook(name, wants(name), is_linear)

        def post(name: str, module: nn.Module) -> Callable:
            return self._make_post_hook(name, wants(name))

        hooks.on_modules(model, pre, post, with_kwargs=True, always_call=True)

    def new_step(self) -> None:
        self.calls = {}
        self.sums = {}
        self.input_flags = {}
        self.no_grad: set[str] = set()  # ran in training mode with autograd off (no gradient can come back)
        self.recomputed: set[str] = set()  # checkpointed: recomputed in backward, or a reentrant first pass

    def modes(self) -> dict[str, list[str]]:
        """How the modules ran this sampled step: ``no_grad`` and ``recomputed`` module names.

        Reentrant activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``, Hugging Face's
        ``gradient_checkpointing_enable()`` default in many versions) runs a block's forward with autograd off
        and again inside backward: with inputs that need no gradient (frozen embeddings), nothing in the block
        gets one. Rules read these to name that cause."""
        return {"no_grad": sorted(self.no_grad), "recomputed": sorted(self.recomputed)}

    def end_step(self) -> None:
        self.sampling = False
        self.sums = {}

    def clear(self) -> None:
        self.sampling = False
        self.sums = {}
        self.input_flags = {}

    # ------------------------------------------------------------------ the hooks
    def _make_pre_hook(self, name: str, wants_stats: bool, is_linear: bool) -> Callable:
        hb = self.heartbeat
        where = f"forward pre-hook of {name or '<model>'}"

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if is_compiling():  # inside a torch.compile'd region: stay out of the graph
                return None
            hb.enter(name)
            if not self.sampling:
                return None
            if module.training:
                if not torch.is_grad_enabled():
                    self.no_grad.add(name)
                    if _in_checkpoint():
                        self.recomputed.add(name)  # a reentrant checkpoint's first pass (rare: a frame walk)
                elif _in_backward():
                    self.recomputed.add(name)
            prof = self.profile
            if not wants_stats:
                if prof is not None:
                    prof.enter(name, hb.stamp)
                return None
            self.guard(where, self.on_inputs, name, args, kwargs, is_linear)
            if prof is not None:  # the statistics' own time is not the module's
                now = time.monotonic()
                prof.discount(now - hb.stamp)
                prof.enter(name, now)
            return None

        return pre_hook

    def _make_post_hook(self, name: str, wants_stats: bool) -> Callable:
        hb = self.heartbeat
        where = f"forward hook of {name or '<model>'}"

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if is_compiling():
                return None
            hb.exit(name)
            if not self.sampling:
                return None
            prof = self.profile
            if prof is not None:
                prof.exit(name, hb.stamp)
            if not wants_stats:
                return None
            self.guard(where, self.on_output, name, output)
            if prof is not None:
                prof.discount(time.monotonic() - hb.stamp)
            return None

        return post_hook

    # ------------------------------------------------------------------ hook bodies (sampled steps)
    def on_inputs(self, name: str, args: tuple, kwargs: dict, is_linear: bool) -> None:
        tensors = float_inputs(args, kwargs)
        if not tensors:
            self.input_flags.setdefault(name, []).append(None)
            return
        key = None
        if is_linear:  # first: its statistics row also holds the input's exact non-finite count (the flag)
            x = tensors[0]
            features = x.dim() >= 2
            key = tensor_key(x)
            row, per_feature = self.engine.row(x, features, key)
            self.collector.add(
                Entry("input", name, "", self.calls.get(name, 0), x.numel(),
                      x.shape[-1] if features else 0), row)
            if per_feature is not None and not self.per_call:
                self.collector.add_feature_absmax(("input", name, ""), per_feature)
            noted = self.sums.get(key)
            if noted is None or noted[0]() is None:  # (a watched module's output is noted already)
                self._note_count(x, row, key)
        # One device scalar, no host read: the sum of the inputs' flags, 0 when every entry of every input is
        # finite (the flags are counts >= 0 or NaN); the host reads anything else as "an input was not finite".
        if len(tensors) == 1:
            flag = self.input_flag(tensors[0], key)
        else:
            device = tensors[0].device
            flag = torch.cat([self.input_flag(t).to(device) for t in tensors]).sum().reshape(1)
        # a stack per name: a module that calls itself keeps each call's own flag
        self.input_flags.setdefault(name, []).append(flag)

    def _note_count(self, t: torch.Tensor, row: torch.Tensor, key: tuple) -> None:
        """Keep ``t``'s exact non-finite count from its row as its flag (no second read when a module takes it
        as input). Only where every finite entry is finite in float32 (not float64, not complex)."""
        if t.element_size() <= 4 and not t.is_complex():
            self.sums[key] = (weakref.ref(t), row[:1])

    def input_flag(self, t: torch.Tensor, key: tuple | None = None) -> torch.Tensor:
        """(1,) float32 device scalar: 0 when every entry of ``t`` is finite, a count > 0 or NaN when not.

        Once per tensor and step (a hidden state feeds several modules): the non-finite count of the
        statistics row when ``t`` was a watched module's output (:meth:`on_output` leaves it here), else
        :func:`finite_flag`.
        """
        key = tensor_key(t) if key is None else key
        hit = self.sums.get(key)
        if hit is not None and hit[0]() is not None:
            return hit[1]
        flag = finite_flag(t)
        self.sums[key] = (weakref.ref(t), flag)
        return flag

    def on_output(self, name: str, output: Any) -> None:
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        stack = self.input_flags.get(name)
        flag = stack.pop() if stack else None
        for path, t in iter_float_tensors(output):
            features = t.dim() >= 2
            key = tensor_key(t)
            row, per_feature = self.engine.row(t, features, key)
            entry = Entry("act", name, path, call, t.numel(), t.shape[-1] if features else 0)
            self._note_count(t, row, key)  # the flag of a module that takes it as input (no second read)
            if flag is None:  # no floating input: nothing to blame upstream
                self.collector.add(entry, row)
            else:  # (RAW_WIDTH + 1,) at the host: the row, then the inputs' flag
                self.collector.add(entry, row, flag.to(row.device))
            if per_feature is not None and not self.per_call:
                self.collector.add_feature_absmax(("act", name, path), per_feature)


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """(1,) float32 on ``t``'s device: 0 when every entry of ``t`` is finite, NaN otherwise; no host read.

    One read of ``t`` in its own dtype (no float32 / float64 copy of a half tensor): its extremes, which are
    entries themselves, so a NaN propagates into them and an infinity is one of them, and ``x * 0`` is 0
    exactly when ``x`` is finite. A sum would not do: finite entries of 1e37 overflow a float32 sum.
    """
    x = t.detach()
    if x.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=x.device)
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj())
    lo, hi = torch.aminmax(x)
    return (lo * 0 + hi * 0).to(torch.float32).reshape(1)
