"""The one path every finding takes into the finding log: propose during a step, settle at its end.

Whoever finds a problem — a statistics rule, an attention check, the memory monitor, the hang watchdog, a
preflight check, the monitor's own error guard — holds a :class:`FindingProducer` for its finding code and
talks to the log only through it:

* :meth:`~FindingProducer.judge` compares a value with the code's resolved threshold (the config's
  per-pattern overrides apply) and proposes a finding when a level is reached; a value clear of the
  warning level (with hysteresis, ``clear_factor``) closes an open one;
* :meth:`~FindingProducer.propose` proposes a finding whose severity the producer decided itself;
* :meth:`~FindingProducer.release` closes the finding on a target;
* :meth:`~FindingProducer.settle` writes what was proposed: updates of open findings, then new ones worst
  first, at most ``rules.max_open`` open per code (the rest counted in ``data.not_opened``), each marked
  when it opened while a run-wide problem was open (``ctx.shared["cause"]``).

So severity ordering, the open-finding cap and cause marking hold alike for every producer, and nothing
else in the package calls :meth:`FindingLog.report` or :meth:`FindingLog.clear`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stethoscope.findings import SEVERITY_RANK, FindingLog
from stethoscope.rules.thresholds import Threshold, ThresholdResolver

Text = str | Callable[[], str]


@dataclass
class RulesSettings:
    """The config's ``rules:`` section as plain values (defaults when the section is absent)."""

    window: int = 20
    smoothing: int = 3
    min_history: int = 5
    min_rows: int = 16
    max_open: int = 8
    explain_normal: bool = False
    saturation_modules: str | list[str] = "auto"

    @classmethod
    def from_config(cls, config: Any) -> RulesSettings:
        section = getattr(config, "rules", None)
        if section is None:
            return cls()
        return cls(**{k: getattr(section, k) for k in cls.__dataclass_fields__ if hasattr(section, k)})


@dataclass
class ProducerContext:
    """What a producer needs: the finding log, the threshold resolver, the ``rules:`` settings (the cap,
    ``explain_normal``) and the run-wide ``shared`` dict (``shared["cause"]``: a run-wide problem now open).
    Rules get a :class:`~stethoscope.rules.base.RuleContext`, which adds facts about the model."""

    findings: FindingLog
    resolver: ThresholdResolver = field(default_factory=ThresholdResolver)
    settings: RulesSettings = field(default_factory=RulesSettings)
    shared: dict = field(default_factory=dict)


class FindingProducer:
    """The finding code ``code`` of one producer, between its checks and the finding log.

    Args:
        ctx: a :class:`ProducerContext` (or a rule's :class:`~stethoscope.rules.base.RuleContext`).
        code: the finding code (default: the class attribute, as rules set it).
        thresholds: threshold key -> default :class:`Threshold` (default: the class attribute).
        clear_factor: hysteresis: an open finding closes once the value is below ``clear_factor`` times
            its warning level (above ``1/clear_factor`` times it for lower-is-worse values).
    """

    code: ClassVar[str] = ""
    thresholds: ClassVar[dict[str, Threshold]] = {}
    clear_factor: ClassVar[float] = 0.8

    def __init__(self, ctx: Any, code: str | None = None, thresholds: dict[str, Threshold] | None = None,
                 clear_factor: float | None = None):
        self.ctx = ctx
        if code is not None:
            self.code = code  # type: ignore[misc]
        if thresholds is not None:
            self.thresholds = thresholds  # type: ignore[misc]
        if clear_factor is not None:
            self.clear_factor = clear_factor  # type: ignore[misc]
        self._candidates: list[_Candidate] = []

    # ------------------------------------------------------------------ reading the state
    def threshold(self, target: str | None, key: str | None = None) -> Threshold:
        """The resolved levels of ``key`` (default: the first threshold key) for ``target``."""
        key = key or next(iter(self.thresholds), self.code)
        return self.ctx.resolver.resolve(key, target, self.thresholds.get(key))

    def is_open(self, target: str | None) -> bool:
        return self.ctx.findings.is_open(self.code, target)

    def open_targets(self) -> list[str | None]:
        # a snapshot first: the watchdog thread may open a finding meanwhile
        return [f.target for f in list(self.ctx.findings.open.values()) if f.code == self.code]

    # ------------------------------------------------------------------ proposing
    def judge(
        self,
        target: str | None,
        value: float | None,
        step: int | None,
        message: Text,
        hint: Text,
        key: str | None = None,
        data: dict | None = None,
        severity: str | None = None,
    ) -> str | None:
        """Compare ``value`` with the resolved threshold: propose a finding on ``target``, or close it.

        ``message`` and ``hint`` may be callables, formatted only when a finding is written. ``severity``
        overrides the computed one (e.g. to lower a critical to a warning for a known-benign case).
        Returns the severity reached, or None.
        """
        th = self.threshold(target, key)
        sev = th.severity(value)
        if sev is not None and severity is not None:
            sev = severity
        if sev is None:
            if value is not None and th.healthy(float(value), self.clear_factor):
                self.release(target, step, value)
            return None
        level = th.level(sev)
        self._candidates.append(_Candidate(  # written with the step settle() is given, like every judged one
            sev, _badness(value, th, sev), target, value, level if level is not None else th.shown, None,
            message, hint, data, th.higher_is_worse, linked=True,
        ))
        return sev

    def propose(
        self,
        target: str | None,
        severity: str,
        value: Any,
        threshold: Any,
        step: int | None,
        message: Text,
        hint: Text,
        data: dict | None = None,
        higher_is_worse: bool = True,
    ) -> None:
        """Propose a finding whose severity was decided by the caller (no threshold lookup)."""
        if severity not in SEVERITY_RANK:
            raise ValueError(f"severity must be one of {tuple(SEVERITY_RANK)}, got {severity!r}")
        self._candidates.append(_Candidate(
            severity, _badness_plain(value, threshold, higher_is_worse), target, value, threshold, step,
            message, hint, data, higher_is_worse, linked=False,
        ))

    def note(self, target: str | None, step: int | None, value: Any, message: Text) -> None:
        """An ``info`` finding explaining that something that looks wrong is normal.

        Written only with ``rules.explain_normal: true`` and once per target; it never affects the verdict.
        """
        if not self.ctx.settings.explain_normal:
            return
        noted = self.ctx.shared.setdefault("noted", set())
        key = (self.code, target)
        if key in noted:
            return
        noted.add(key)
        self.propose(target, "info", value, None, step, message, "nothing to fix: this is expected")

    def release(self, target: str | None, step: int | None, value: Any = None) -> None:
        """The condition on ``target`` no longer holds: close its finding if one is open (at once)."""
        self.ctx.findings.clear(self.code, target, step, value)

    # ------------------------------------------------------------------ settling
    def settle(self, step: int | None) -> list[dict]:
        """Write what was proposed since the last settle; returns the events written.

        Updates of open findings first, then new ones worst first up to ``rules.max_open`` open for this
        code. A finding that opens while a run-wide problem is open (``ctx.shared["cause"]``: a gradient-norm
        spike, a NaN in the forward pass) says so in its message and in ``data.after``.
        """
        if not self._candidates:
            return []
        candidates, self._candidates = self._candidates, []
        candidates.sort(key=lambda c: (-SEVERITY_RANK[c.severity], -c.badness))
        log = self.ctx.findings
        open_now = {f.target: f for f in list(log.open.values()) if f.code == self.code}
        room = max(0, self.ctx.settings.max_open - len(open_now))
        chosen, dropped = [], []
        for cand in candidates:
            if cand.target not in open_now:
                if room <= 0:
                    dropped.append(cand.target)
                    continue
                room -= 1
            chosen.append(cand)
        cause = self.ctx.shared.get("cause")
        written = []
        for cand in chosen:
            current = open_now.get(cand.target)
            data, message = cand.data, cand.message
            if current is None:
                if cand.linked and cause and cause["code"] != self.code:
                    data = {**(data or {}), "after": cause["code"], "after_step": cause["step"],
                            "after_what": cause["what"]}
                if dropped:
                    data = {**(data or {}), "not_opened": {"count": len(dropped), "targets": dropped[:10]}}
            after = (data or {}).get("after") or (current.data.get("after") if current is not None else None)
            if after:  # keep saying so in later updates too: the folded finding shows the last message
                source = data if (data or {}).get("after") else current.data
                message = _after(message, source)
            event = log.report(
                self.code, cand.target, cand.severity, _plain(cand.value), _plain(cand.threshold),
                _text(message), _text(cand.hint), cand.step if cand.step is not None else step,
                data=data, higher_is_worse=cand.higher_is_worse,
            )
            if event is not None:
                written.append(event)
        return written


class _Candidate:
    """A proposed finding, waiting for :meth:`FindingProducer.settle`."""

    __slots__ = ("badness", "data", "higher_is_worse", "hint", "linked", "message", "severity", "step", "target",
                 "threshold", "value")

    def __init__(self, severity: str, badness: float, target: str | None, value: Any, threshold: Any,
                 step: int | None, message: Text, hint: Text, data: dict | None, higher_is_worse: bool,
                 linked: bool):
        self.severity, self.badness, self.target, self.value = severity, badness, target, value
        self.threshold, self.step, self.message, self.hint = threshold, step, message, hint
        self.data, self.higher_is_worse, self.linked = data, higher_is_worse, linked


# ---------------------------------------------------------------------- small helpers
def _after(message: Text, data: dict) -> Callable[[], str]:
    """A message that says it opened while a run-wide problem was already open (likely its consequence)."""
    return lambda: (
        f"{_text(message)}. It opened while {data.get('after_what', 'a run-wide problem')} "
        f"(`{data['after']}`, since step {data.get('after_step')}) was open: probably a consequence — fix that "
        "first"
    )


def _text(t: Text) -> str:
    return t() if callable(t) else str(t)


def _plain(v: Any) -> Any:
    """A JSON-friendly number: NaN as None, ±inf as strings; everything else as it is."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _badness(value: Any, th: Threshold, sev: str) -> float:
    """How far past its level a value is (log scale), to open the worst findings first."""
    level = th.level(sev)
    return _badness_plain(value, level, th.higher_is_worse)


def _badness_plain(value: Any, level: Any, higher_is_worse: bool) -> float:
    try:
        v = abs(float(value))
        level = abs(float(level)) if level is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
    if not math.isfinite(v):
        return math.inf
    if level <= 0 or v <= 0:
        return v
    r = math.log(v / level)
    return r if higher_is_worse else -r
