"""The monitor's MoE extension: router statistics on sampled steps, expert-load windows, routing findings.

Per sampled step, each router call is reduced on the device by :func:`~stethoscope.moe.capture.router_row`
and queued (kind ``moe``), so it reaches the host in the step's one transfer. :meth:`MoEExtension.observe`
merges each router's calls, writes one ``kind: "moe"`` metrics row per router (with its per-expert ``load``,
the report's heatmap), adds the step to the router's window and runs :mod:`stethoscope.moe.rules`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import deque
from typing import Any

from torch import nn

from stethoscope.collector import Entry
from stethoscope.extensions import Extension
from stethoscope.hooks import is_compiling
from stethoscope.moe.capture import TAIL, Router, find_routers, merge_rows, router_row, split_output
from stethoscope.moe.rules import RULES, RouterWindow
from stethoscope.naming import make_filter, patterns
from stethoscope.rundir import SCHEMA_VERSION


def extension(run: Any) -> MoEExtension | None:
    cfg = run.config.moe
    model = run.model
    if not cfg.enabled or model is None:
        return None
    routers = find_routers(model, cfg.modules, cfg.top_k)
    return MoEExtension(run, model, routers) if routers else None


def _capacity_factor(model: nn.Module, default: float) -> float:
    """The capacity factor the model's config sets (Switch-style configs), else the configured one."""
    config = getattr(model, "config", None)
    for key in ("capacity_factor", "router_capacity_factor", "expert_capacity_factor"):
        v = getattr(config, key, None)
        if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
            return float(v)
    return default


class MoEExtension(Extension):
    """Watches every router (see the module docstring). ``routers``: name -> (experts, top-k) found."""

    name = "moe"

    def __init__(self, run: Any, model: nn.Module, routers: list[Router]):
        self._run = run
        cfg = run.config.moe
        self.routers = {r.name: (r.experts, r.top_k) for r in routers}
        self.capacity_factor = _capacity_factor(model, cfg.capacity_factor)
        self._window_steps = cfg.window
        self._min_tokens = cfg.min_tokens_per_expert
        self._windows: dict[str, deque] = {}  # router -> the last `window` sampled steps' host rows
        self._hooks = run.hooks("moe")
        for r in routers:
            self._hooks.forward(r.module, self._make_hook(r))
        section = getattr(run.config, "rules", None)
        enabled = make_filter(patterns(getattr(section, "enabled", "*")))
        disabled = make_filter(patterns(getattr(section, "disabled", "")))
        self._rules = [cls(run.rule_context) for cls in RULES if enabled(cls.code) and not disabled(cls.code)]

    def _make_hook(self, router: Router):
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ext = ref()
            if ext is None or is_compiling() or not ext._run.sampling:
                return None
            ext._run.guard(f"router statistics of {router.name or '<model>'}", ext._measure, router, output)
            return None

        return hook

    def _measure(self, router: Router, output: Any) -> None:
        logits, index = split_output(output, router.experts)
        if logits is None or logits.dim() < 1 or logits.shape[-1] < 2:
            return
        if index is not None and index.numel() != logits.numel() // logits.shape[-1] * index.shape[-1]:
            index = None  # not one row of choices per token: recompute them
        experts = logits.shape[-1]
        row = router_row(logits, index, router.top_k)  # (2E + TAIL,)
        self._run.queue(Entry("moe", router.name, "", 0, logits.numel(), extra={"experts": experts,
                                                                                  "top_k": router.top_k}), row)

    # ------------------------------------------------------------------ the record
    def observe(self, record: Any) -> None:
        if not record.sampled:
            return
        groups: dict[str, list] = {}
        meta: dict[str, dict] = {}
        for entry, row in getattr(record, "extras", {}).get("moe", []):
            E = int(entry.extra.get("experts", 0))
            if row is None or len(row) != 2 * E + TAIL:
                continue
            groups.setdefault(entry.name, []).append(row)
            meta[entry.name] = entry.extra
        summaries = []
        for name, rows in groups.items():
            E, k = int(meta[name]["experts"]), int(meta[name]["top_k"])
            step_row = merge_rows(rows, E)
            window = self._windows.setdefault(name, deque(maxlen=self._window_steps))
            window.append(step_row)
            self._write(record.step, name, E, k, step_row)
            summaries.append(self._summary(name, E, k, list(window)))
        for rule in self._rules:
            rule.check_routers(record.step, summaries)

    def _summary(self, name: str, E: int, k: int, window: list[list[float]]) -> RouterWindow:
        total = merge_rows(window, E)
        recent = merge_rows(window[-max(1, self._run.config.rules.smoothing):], E)
        tokens = recent[2 * E]
        load = total[:E]
        return RouterWindow(
            name=name, experts=E, top_k=k, load=load, tokens=total[2 * E], steps=len(window),
            entropy=_entropy_norm(recent[2 * E + 1] / tokens, E) if tokens else math.nan,
            mean_entropy=_distribution_entropy(recent[E:2 * E], k),
            log_z_rms=math.sqrt(recent[2 * E + 2] / tokens) if tokens else math.nan,
            logit_absmax=recent[-1], capacity_factor=self.capacity_factor,
            extra={"enough": sum(load) / E >= self._min_tokens},
        )

    def _write(self, step: int | None, name: str, E: int, k: int, row: list[float]) -> None:
        run = self._run
        if run.metrics_capped:
            return
        tokens = row[2 * E]
        load = row[:E]
        mean = sum(load) / E if E else 0.0
        run.write_metrics({
            "schema_version": SCHEMA_VERSION, "step": step, "kind": "moe", "name": name, "experts": E, "top_k": k,
            "tokens": int(tokens), "load": [int(x) for x in load],
            "max_over_mean": max(load) / mean if mean > 0 else None,
            "dead": sum(1 for x in load if x <= 0),
            "entropy": _plain(_entropy_norm(row[2 * E + 1] / tokens, E)) if tokens else None,
            "mean_entropy": _plain(_distribution_entropy(row[E:2 * E], k)),
            "log_z_rms": _plain(math.sqrt(row[2 * E + 2] / tokens)) if tokens else None,
            "logit_absmax": _plain(row[-1]),
        })
        run.flush_metrics()

    # ------------------------------------------------------------------ lifecycle
    def state_dict(self) -> dict:
        return {"windows": {k: [list(map(float, r)) for r in v] for k, v in self._windows.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, rows in state.get("windows", {}).items():
            self._windows[name] = deque(rows, maxlen=self._window_steps)

    def detach(self) -> None:
        self._hooks.remove()
        for rule in self._rules:
            with contextlib.suppress(Exception):
                rule.detach()


def _entropy_norm(entropy: float, experts: int) -> float:
    return entropy / math.log(experts) if experts > 1 else math.nan


def _distribution_entropy(mass: list[float], k: int = 1) -> float:
    """Entropy of the mean router distribution over tokens, scaled so that 1 is every expert equally likely and
    0 is all the mass on ``k`` experts (a top-k router that sends every token to the same k)."""
    total = sum(mass)
    E = len(mass)
    k = max(1, min(k, E - 1))
    if total <= 0 or E < 2:
        return math.nan
    h = -sum((m / total) * math.log(m / total) for m in mass if m > 0)
    return max(0.0, (h - math.log(k)) / (math.log(E) - math.log(k)))


def _plain(v: float) -> float | None:
    return v if math.isfinite(v) else None
