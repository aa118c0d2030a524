"""Say what was not seen: ``monitor.unobserved``, an info finding listing what stethoscope could not watch.

A verdict of "healthy" means something only if the checks ran. Some things are invisible to hooks: the body
of a ``torch.compile``'d model runs as one graph (its submodules' hooks never fire), attention computed by a
fused kernel that cannot be read, modules left out by ``stats.modules``. This extension watches which modules
and parameters actually produced statistics on sampled steps and, at close, reports what never did — with
the reason where it can tell and what to do — so the report's summary says what the verdict does not cover.

It is silent when everything selected was observed, and says nothing before a sampled step has been seen.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from stethoscope.extensions import Extension
from stethoscope.hooks import walk_modules
from stethoscope.naming import make_filter, patterns
from stethoscope.record import StepRecord
from stethoscope.rules import hints as H
from stethoscope.rules.producer import FindingProducer

CODE = "monitor.unobserved"
MAX_LISTED = 12  # names quoted in the message (all of them are in data)


def _compiled(model: nn.Module) -> list[str]:
    """Names of the modules that are ``torch.compile`` wrappers (``OptimizedModule``), ``""`` for the root."""
    out = []
    for name, module in model.named_modules():
        if type(module).__name__ == "OptimizedModule" or hasattr(module, "_orig_mod"):
            out.append(name)
    return out


class CoverageExtension(Extension):
    """See the module docstring."""

    name = "coverage"

    def __init__(self, run: Any, model: nn.Module):
        self._run = run
        cfg = run.config
        wanted = make_filter(patterns(cfg.stats.modules))
        names = [n for n, _ in walk_modules(model)]
        # modules whose outputs the monitor wants statistics of (leaves and containers alike)
        self.expected: list[str] = [n for n in names if wanted(n)]
        self.excluded = len(names) - len(self.expected)
        self.compiled = _compiled(model)
        self.seen: set[str] = set()
        self.sampled_steps = 0
        self.attention: dict[str, str] = {}

    def observe(self, record: StepRecord) -> None:
        if not record.sampled or not record.acts:
            return
        self.sampled_steps += 1
        self.seen.update(name for name, _output, _call in record.acts)

    def close(self, status: str) -> None:
        if self.sampled_steps == 0:
            return
        attention = self._run.extension("attention")
        unread = {impl: what for impl, what in getattr(attention, "implementations", {}).items()
                  if what.startswith("not captured")}
        # a module that never ran (an unused branch, a dropout the fused attention skips) has nothing to see;
        # inside a compiled model nothing runs through the hooks, which is what must be said
        missing = [n for n in self.expected if n not in self.seen] if self.compiled else []
        history = self._run.rule_context.settings.min_history
        short = self.sampled_steps < history
        if not missing and not unread and not short:
            return
        parts = []
        if missing:
            listed = ", ".join(f"`{n or '<model>'}`" for n in missing[:MAX_LISTED])
            more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
            where = ", ".join(f"`{n or '<model>'}`" for n in self.compiled[:3])
            parts.append(f"{len(missing)} of the {len(self.expected)} modules selected by stats.modules produced no "
                         f"statistics on any of {self.sampled_steps} sampled step(s) ({listed}{more}): {where} is "
                         "compiled with torch.compile, its submodules run as one graph where module hooks do not "
                         "fire, so no rule looked inside it")
        if unread:
            parts.append("attention not captured: " + "; ".join(f"{k}: {v}" for k, v in unread.items()))
        if short:
            parts.append(f"only {self.sampled_steps} sampled step(s): the trend checks (grad.dead_trend, the "
                         f"running medians of grad.norm_spike and update.ratio) need rules.min_history = {history}")
        message = "what stethoscope could not see, so no check covers it: " + "; ".join(parts)
        data = {"unobserved": missing[:5000], "expected": len(self.expected), "sampled_steps": self.sampled_steps,
                "compiled": self.compiled, "attention_not_captured": unread,
                "excluded_by_pattern": self.excluded}
        producer = FindingProducer(self._run.rule_context, CODE)
        producer.propose(None, "info", len(missing), None, self._run.last_step, message,
                          H.hint(CODE, compiled=bool(missing), attention=bool(unread), short=short), data)
        producer.settle(self._run.last_step)

    def state_dict(self) -> dict:
        return {"seen": sorted(self.seen), "sampled_steps": self.sampled_steps}

    def load_state_dict(self, state: dict) -> None:
        self.seen.update(state.get("seen", []))
        self.sampled_steps = int(state.get("sampled_steps", 0))


def extension(run: Any) -> CoverageExtension | None:
    model = run.model
    if model is None:
        return None
    return CoverageExtension(run, model)
