"""The few headline numbers of a run, as plain floats: what a framework's log line or a TensorBoard scalar
can carry without the whole statistics table.

* ``findings_critical`` / ``findings_warning`` / ``findings_info`` — findings opened so far, by the worst
  severity each reached (the monitor's own counts);
* ``findings_open`` — findings open right now;
* ``zero_grad_fraction_max`` — the worst gradient zero fraction over the watched parameters on the last
  sampled step, *beyond what is normal* (the same judgement ``grad.zero_fraction`` makes: embeddings skipped,
  a key-projection bias's exact zeros taken out), so a healthy run reads near 0;
* ``grad_norm`` — the global gradient norm of the last sampled step.

:class:`Headline` is an extension (``name = "headline"``): :func:`attach` adds it to a monitor once, and
it keeps the last sampled step's numbers as records are flushed.
"""

from __future__ import annotations

import math
from typing import Any

from stethoscope.extensions import Extension
from stethoscope.record import StepRecord

PREFIX = "stethoscope/"


def worst_zero_fraction(record: StepRecord, rule: Any = None) -> float | None:
    """The largest gradient zero fraction of a sampled step beyond what is normal (None without grads).

    ``rule`` is any built-in rule of the monitor (it carries the model facts that say which parameters are
    embeddings or key biases); without one the raw zero fractions are used.
    """
    if not record.grads:
        return None
    from stethoscope.rules.grads import judged_step

    if not judged_step(record):  # a skipped or clipped-from-inf step: its zeros are not dead units
        return None
    worst: float | None = None
    if rule is not None:
        from stethoscope.rules.grads import excess_zero_fraction

        for name, rec in record.grads.items():
            zf = excess_zero_fraction(rule, name, rec.stats)
            if zf is not None and (worst is None or zf > worst):
                worst = zf
        return 0.0 if worst is None else float(worst)
    for rec in record.grads.values():
        zf = rec.stats.zero_fraction
        if zf == zf and (worst is None or zf > worst):
            worst = zf
    return worst


def a_rule(run: Any) -> Any:
    """Any running rule with a context (it carries the model facts), or None. ``run``: a run context."""
    for rule in run.rules:
        if getattr(rule, "ctx", None) is not None:
            return rule
    return None


class Headline(Extension):
    """Keeps the headline numbers of the last sampled step (see the module docstring)."""

    name = "headline"

    def __init__(self, run: Any):
        self._run = run
        self.step: int | None = None
        self.zero_grad_fraction_max: float | None = None
        self.grad_norm: float | None = None

    def observe(self, record: StepRecord) -> None:
        if not record.grads:
            return
        self.step = record.step
        self.zero_grad_fraction_max = worst_zero_fraction(record, a_rule(self._run))
        gn = record.grad_norm
        self.grad_norm = gn if math.isfinite(gn) else None

    def values(self) -> dict[str, float]:
        """The headline numbers as plain floats (names without the ``stethoscope/`` prefix)."""
        return headline_values(self._run, self)


def headline_values(run: Any, headline: Headline | None = None) -> dict[str, float]:
    """Findings counts (always) and the last sampled step's numbers (once there is one), as plain floats.
    ``run``: the run context or the monitor (both carry ``findings``)."""
    out: dict[str, float] = {}
    findings = getattr(run, "findings", None) if run is not None else None
    if findings is not None:
        counts = findings.counts
        for sev in ("critical", "warning", "info"):
            out[f"findings_{sev}"] = float(counts.get(sev, 0))
        out["findings_open"] = float(len(findings.open))
    if headline is not None:
        if headline.zero_grad_fraction_max is not None:
            out["zero_grad_fraction_max"] = float(headline.zero_grad_fraction_max)
        if headline.grad_norm is not None:
            out["grad_norm"] = float(headline.grad_norm)
    return out


def attach(monitor: Any) -> Headline | None:
    """The monitor's :class:`Headline`, added on first use (None for a disabled monitor)."""
    if monitor is None or getattr(monitor, "disabled", False):
        return None
    ext = monitor.extension(Headline.name)
    if ext is None:
        ext = Headline(monitor.context)
        monitor.add_extension(ext)
    return ext
