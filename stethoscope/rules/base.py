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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stethoscope.record import StepRecord
from stethoscope.rules.model_info import ModelInfo
from stethoscope.rules.producer import FindingProducer, ProducerContext, RulesSettings
from stethoscope.rules.thresholds import Threshold, ThresholdResolver, register_threshold


@dataclass
class RuleContext(ProducerContext):
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

    info: ModelInfo = field(default_factory=ModelInfo)
    eps: float = 1e-8
    saturation: float = 3.0
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


class Rule(FindingProducer):
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
        super().__init__(ctx)
        self.name = self.code

    # ------------------------------------------------------------------ the lifecycle (override check)
    def observe(self, record: StepRecord) -> None:
        if self.sampled_only and not record.sampled:
            return
        self.check(record)
        self.settle(record.step)

    def check(self, record: StepRecord) -> None:
        """Look at one step and call :meth:`judge` (or :meth:`propose` / :meth:`release`) per target."""

    def finish(self, last_step: int | None) -> None:
        """Called once at ``close()`` (then :meth:`settle`); findings still open stay open (they held until
        the end)."""

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

    # 0.1's name for :meth:`propose`: the finding is written at the step's settle like every other
    emit = FindingProducer.propose


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
