"""The rule base class, the public registry, and the context every rule reads.

A rule turns each flushed :class:`~stethoscope.record.StepRecord` into findings. The smallest one::

    from stethoscope.rules import Rule, Threshold, register_rule

    @register_rule
    class LossTooHigh(Rule):
        code = "custom.loss_high"
        thresholds = {"custom.loss_high": Threshold(warning=5.0, critical=20.0)}
        sampled_only = False  # the loss is logged on every step

        def check(self, record):
            loss = record.scalars.get("loss")
            if loss is not None:
                self.judge("", loss, record.step, message=f"loss {loss:.3g}", hint="lower the learning rate")

:meth:`Rule.judge` resolves the thresholds for the target (the config's pattern overrides apply), opens a
finding when a level is reached, writes an ``update`` only when it worsens, and closes it once the value is
clear of the warning level (with a little hysteresis). Everything a rule keeps between steps goes through
``state_dict`` / ``load_state_dict`` as plain JSON data, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stethoscope.findings import SEVERITY_RANK, FindingLog
from stethoscope.record import StepRecord
from stethoscope.rules.model_info import ModelInfo
from stethoscope.rules.thresholds import Threshold, ThresholdResolver, register_threshold

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
class RuleContext:
    """What a rule may use: the finding log, thresholds, settings, and plain facts about the model.

    Attributes:
        findings: where findings go (``report`` / ``clear``).
        resolver: resolves thresholds against the config's pattern overrides.
        settings: the ``rules:`` config section.
        info: module types, parameter facts, optimizer groups (plain data, see ``model_info.py``).
        eps: the ``stats.eps`` below which a value counts as zero.
        saturation: the ``stats.saturation`` bound.
        shared: a scratch dict rules use to tell each other what they found this run (e.g. the forward
            origin of a NaN, so ``grad.nonfinite`` can point at it).
    """

    findings: FindingLog
    resolver: ThresholdResolver = field(default_factory=ThresholdResolver)
    settings: RulesSettings = field(default_factory=RulesSettings)
    info: ModelInfo = field(default_factory=ModelInfo)
    eps: float = 1e-8
    saturation: float = 3.0
    shared: dict = field(default_factory=dict)
    _optimizer: Callable[[], Any] | None = None  # a weak way to the live learning rates

    @classmethod
    def from_run(cls, run: Any) -> RuleContext:
        """The context for rules of a running monitor (``run``: its
        :class:`~stethoscope.monitor.context.RunContext`); the model is inspected here, once."""
        cfg = run.config
        optimizer = run.optimizer
        info = ModelInfo.inspect(run.model, optimizer, scaler=run.has_scaler)

        def live_optimizer() -> Any:
            return run.optimizer

        return cls(
            findings=run.findings,
            resolver=ThresholdResolver(cfg.thresholds),
            settings=RulesSettings.from_config(cfg),
            info=info,
            eps=cfg.stats.eps,
            saturation=cfg.stats.saturation,
            _optimizer=live_optimizer if optimizer is not None else None,
        )

    def lr(self, param: str) -> float | None:
        """The current learning rate of ``param``'s optimizer group (live: schedulers move it)."""
        pi = self.info.params.get(param)
        if pi is None or pi.group is None:
            return None
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is not None:
            try:
                return float(opt.param_groups[pi.group]["lr"])
            except (IndexError, KeyError, TypeError, ValueError):
                pass
        try:
            return float(self.info.group_hparams[pi.group]["lr"])
        except (IndexError, KeyError, TypeError, ValueError):
            return None

    def detach(self) -> None:
        self._optimizer = None


class Rule:
    """Base class of every health rule (built-in or yours). Subclass, set ``code``, implement ``check``.

    Class attributes:
        code: the finding code this rule emits (also its name in the monitor state).
        thresholds: threshold key -> default :class:`Threshold`; the first key is the rule's own.
        summary: one line saying what it watches (shown by ``registered_rules()`` and the docs).
        sampled_only: run ``check`` on sampled steps only (unsampled records carry only scalars).
        clear_factor: hysteresis: an open finding closes once the value is below ``clear_factor`` times
            its warning level (above ``1/clear_factor`` times it for lower-is-worse values).
        order: rules run in ascending ``order``, then in registration order (built-ins use 0-30; the default
            100 runs yours after them, so ``ctx.shared`` already holds what the built-ins found).

    Lifecycle (driven by the monitor): ``observe(record)`` every flushed step, ``finish(last_step)`` at
    close, ``state_dict`` / ``load_state_dict`` for resume, ``detach()`` when the monitor lets go of the
    model. A rule that raises is reported once as ``monitor.error`` and training goes on.
    """

    code: ClassVar[str] = ""
    thresholds: ClassVar[dict[str, Threshold]] = {}
    summary: ClassVar[str] = ""
    sampled_only: ClassVar[bool] = True
    clear_factor: ClassVar[float] = 0.8
    order: ClassVar[int] = 100

    def __init__(self, ctx: RuleContext):
        self.ctx = ctx
        self.name = self.code
        self._candidates: list[tuple] = []

    # ------------------------------------------------------------------ the lifecycle (override check)
    def observe(self, record: StepRecord) -> None:
        if self.sampled_only and not record.sampled:
            return
        self.check(record)
        self.settle(record.step)

    def check(self, record: StepRecord) -> None:
        """Look at one step and call :meth:`judge` (or :meth:`emit` / :meth:`release`) per target."""

    def finish(self, last_step: int | None) -> None:
        """Called once at ``close()``; findings still open stay open (they held until the end)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def detach(self) -> None:
        self.ctx.detach()

    # ------------------------------------------------------------------ helpers
    @property
    def settings(self) -> RulesSettings:
        return self.ctx.settings

    @property
    def info(self) -> ModelInfo:
        return self.ctx.info

    def threshold(self, target: str | None, key: str | None = None) -> Threshold:
        """The resolved levels of ``key`` (default: the rule's first threshold key) for ``target``."""
        key = key or next(iter(self.thresholds), self.code)
        return self.ctx.resolver.resolve(key, target, self.thresholds.get(key))

    def is_open(self, target: str | None) -> bool:
        return self.ctx.findings.is_open(self.code, target)

    def open_targets(self) -> list[str | None]:
        # a snapshot first: the watchdog thread may open a finding meanwhile
        return [f.target for f in list(self.ctx.findings.open.values()) if f.code == self.code]

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
        """Compare ``value`` with the resolved threshold and open/update/close the finding on ``target``.

        ``message`` and ``hint`` may be callables, formatted only when a finding is written. ``severity``
        overrides the computed one (e.g. to lower a critical to a warning for a known-benign case).
        Returns the severity reached, or None. New findings are emitted by :meth:`settle` (the monitor
        calls it after ``check``), worst first, at most ``rules.max_open`` open per rule.
        """
        th = self.threshold(target, key)
        sev = th.severity(value)
        if sev is not None and severity is not None:
            sev = severity
        if sev is None:
            if value is not None and th.healthy(float(value), self.clear_factor):
                self.release(target, step, value)
            return None
        self._candidates.append((sev, _badness(value, th, sev), target, value, th, message, hint, data))
        return sev

    def release(self, target: str | None, step: int | None, value: Any = None) -> None:
        """The condition on ``target`` no longer holds: close its finding if one is open."""
        self.ctx.findings.clear(self.code, target, step, value)

    def emit(
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
    ) -> dict | None:
        """Write a finding event right away (no threshold lookup, no cap)."""
        return self.ctx.findings.report(
            self.code,
            target,
            severity,
            _plain(value),
            _plain(threshold),
            _text(message),
            _text(hint),
            step,
            data=data,
            higher_is_worse=higher_is_worse,
        )

    def note(self, target: str | None, step: int | None, value: Any, message: Text) -> None:
        """An ``info`` finding explaining that something that looks wrong is normal.

        Written only with ``rules.explain_normal: true`` and once per target; it never affects the verdict.
        """
        if not self.settings.explain_normal:
            return
        noted = self.ctx.shared.setdefault("noted", set())
        key = (self.code, target)
        if key in noted:
            return
        noted.add(key)
        self.emit(target, "info", value, None, step, message, "nothing to fix: this is expected")

    def settle(self, step: int | None) -> None:
        """Write this step's judged findings: updates of open ones, then new ones worst first up to the cap.

        A finding that opens while a run-wide problem is open (``ctx.shared["cause"]``: a gradient-norm
        spike, a NaN in the forward pass) says so in its message and in ``data.after``.
        """
        if not self._candidates:
            return
        candidates, self._candidates = self._candidates, []
        candidates.sort(key=lambda c: (-SEVERITY_RANK[c[0]], -c[1]))
        log = self.ctx.findings
        open_now = {f.target: f for f in list(log.open.values()) if f.code == self.code}
        room = max(0, self.settings.max_open - len(open_now))
        chosen, dropped = [], []
        for cand in candidates:
            target = cand[2]
            if target not in open_now:
                if room <= 0:
                    dropped.append(target)
                    continue
                room -= 1
            chosen.append(cand)
        cause = self.ctx.shared.get("cause")
        for sev, _bad, target, value, th, message, hint, data in chosen:
            current = open_now.get(target)
            if current is None:
                if cause and cause["code"] != self.code:
                    data = {
                        **(data or {}),
                        "after": cause["code"],
                        "after_step": cause["step"],
                        "after_what": cause["what"],
                    }
                if dropped:
                    data = {**(data or {}), "not_opened": {"count": len(dropped), "targets": dropped[:10]}}
            after = (data or {}).get("after") or (current.data.get("after") if current is not None else None)
            if after:  # keep saying so in later updates too: the folded finding shows the last message
                source = data if (data or {}).get("after") else current.data
                message = _after(message, source)
            level = th.level(sev)
            self.emit(
                target,
                sev,
                value,
                level if level is not None else th.shown,
                step,
                message,
                hint,
                data=data,
                higher_is_worse=th.higher_is_worse,
            )


# ---------------------------------------------------------------------- the registry
_REGISTRY: dict[str, type[Rule]] = {}


def register_rule(cls: type[Rule] | None = None, *, replace: bool = False) -> Any:
    """Register a :class:`Rule` subclass so every new monitor runs it. Usable as a decorator.

    Its ``thresholds`` keys become valid ``rule:`` values in the config's ``thresholds:`` list. A second
    rule with the same ``code`` is an error unless ``replace=True`` (e.g. to swap a built-in for your own).
    """

    def add(rule_cls: type[Rule]) -> type[Rule]:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, Rule)):
            raise TypeError(f"register_rule needs a subclass of stethoscope.rules.Rule, got {rule_cls!r}")
        code = getattr(rule_cls, "code", "")
        if not code or not isinstance(code, str):
            raise ValueError(f"{rule_cls.__name__}.code must be a non-empty finding code such as 'custom.x'")
        if code in _REGISTRY and _REGISTRY[code] is not rule_cls and not replace:
            raise ValueError(
                f"a rule with code {code!r} is already registered ({_REGISTRY[code].__name__}); "
                "pass replace=True to swap it"
            )
        for key, th in rule_cls.thresholds.items():
            if not isinstance(th, Threshold):
                raise TypeError(f"{rule_cls.__name__}.thresholds[{key!r}] must be a Threshold, got {th!r}")
            register_threshold(key, th, rule_cls.summary)
        _REGISTRY[code] = rule_cls
        return rule_cls

    return add(cls) if cls is not None else add


def unregister_rule(code: str) -> type[Rule] | None:
    """Remove a registered rule (its threshold keys stay known). Returns the class, or None."""
    return _REGISTRY.pop(code, None)


def registered_rules() -> dict[str, type[Rule]]:
    """code -> rule class for every registered rule, in the order they run (``order``, then registration)."""
    ranked = sorted(enumerate(_REGISTRY.items()), key=lambda item: (item[1][1].order, item[0]))
    return {code: cls for _, (code, cls) in ranked}


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
    """A JSON-friendly number: NaN/inf as strings would break nothing, but keep floats finite or None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _badness(value: Any, th: Threshold, sev: str) -> float:
    """How far past its level a value is (log scale), to open the worst findings first."""
    try:
        v = abs(float(value))
        level = th.level(sev)
        level = abs(float(level)) if level is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
    if not math.isfinite(v):
        return math.inf
    if level <= 0 or v <= 0:
        return v
    r = math.log(v / level)
    return r if th.higher_is_worse else -r
