"""The run context: everything extensions, rules, sinks and integrations may use of a running monitor.

The monitor's own attributes are private and free to change; this object is the contract. It holds the
monitor weakly (a forgotten monitor must still be freed, and its hooks with it), so once the monitor is
gone every property reads ``None`` / ``False`` and every method does nothing.

What it offers:

* facts: ``config``, ``run_dir``, ``rank`` / ``world_size``, ``schedule``, the ``heartbeat``;
* the step boundary moments ``step_entered_at`` / ``step_ending_at`` (``perf_counter`` seconds, before the
  monitor's own work there), for the step-time breakdown;
* the model, optimizer and scaler (``None`` after ``close()``), the current ``step`` / ``last_step`` /
  ``epoch``, whether this moment is ``sampling`` (a sampled step, not paused);
* ``guard`` / ``record_error``: an exception in a feature becomes one ``monitor.error`` finding;
* ``hooks(owner)``: a :class:`~stethoscope.hooks.HookSet` the monitor also removes when it lets go;
* ``queue(entry, row)``: a device row for this step's one transfer (it comes back in the step record's
  ``extras``); ``write_metrics(row)`` / ``flush_metrics()``: rows in ``metrics.jsonl``;
* ``rule_context``: what a :class:`~stethoscope.rules.producer.FindingProducer` needs — every finding is
  proposed through one and written at its ``settle`` (``findings`` is the log, for reading);
* ``rules``: the running rules; ``extension(name)``;
* ``gradient_norm(params)``: the total gradient norm the monitor's own read gives at the optimizer step, where
  it has one on the host;
* ``write_meta(status, error)``: rewrite ``meta.json`` (a crash seen outside a step, e.g. SIGTERM).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stethoscope.collector import Entry
from stethoscope.config import Config
from stethoscope.findings import FindingLog
from stethoscope.heartbeat import Heartbeat
from stethoscope.hooks import HookSet

if TYPE_CHECKING:  # pragma: no cover
    from stethoscope.monitor.core import Monitor


class RunContext:
    """A monitor's public face for the components it drives (see the module docstring)."""

    def __init__(self, monitor: Monitor):
        self._monitor: Callable[[], Monitor | None] = weakref.ref(monitor)
        self.config: Config = monitor.config
        self.run_dir: Path = monitor.run_dir
        self.rank: int | None = monitor.rank
        self.world_size: int = monitor.world_size
        self.schedule = monitor.schedule
        self.heartbeat: Heartbeat = monitor.heartbeat
        self.findings: FindingLog = monitor.findings
        self._rule_context: Any = None

    # ------------------------------------------------------------------ what the run is doing
    @property
    def monitor(self) -> Monitor | None:
        """The monitor itself (None once it is gone): for its public API only."""
        return self._monitor()

    @property
    def model(self) -> nn.Module | None:
        mon = self._monitor()
        return mon._model_ref() if mon is not None else None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        mon = self._monitor()
        return mon._optimizer_ref() if mon is not None else None

    @property
    def scaler(self) -> Any:
        mon = self._monitor()
        return mon._gradients.scaler if mon is not None else None

    @property
    def has_scaler(self) -> bool:
        """Whether a ``GradScaler`` was passed to the monitor."""
        mon = self._monitor()
        return mon is not None and mon._scaler_given

    @property
    def sampling(self) -> bool:
        """True inside a sampled step that is not paused: hooks should compute their statistics now."""
        mon = self._monitor()
        return mon is not None and mon._forward.sampling

    @property
    def step(self) -> int | None:
        """The open step, or None between steps."""
        mon = self._monitor()
        return mon._step if mon is not None else None

    @property
    def last_step(self) -> int | None:
        mon = self._monitor()
        return mon._last_step if mon is not None else None

    @property
    def epoch(self) -> int | None:
        mon = self._monitor()
        return mon._epoch if mon is not None else None

    @property
    def step_entered_at(self) -> float | None:
        """``time.perf_counter()`` when ``begin_step`` was last called, before the monitor's own work there
        (the previous step's flush): the step-time breakdown tells the monitor's time from the data wait."""
        mon = self._monitor()
        return getattr(mon, "_entered_at", None) if mon is not None else None

    @property
    def step_ending_at(self) -> float | None:
        """``time.perf_counter()`` when the open or last step's block ended, before the monitor's end-of-step
        work."""
        mon = self._monitor()
        return getattr(mon, "_ending_at", None) if mon is not None else None

    @property
    def closed(self) -> bool:
        mon = self._monitor()
        return mon is None or mon.closed

    @property
    def watchdog(self) -> Any:
        """The hang watchdog, or None when it is off (``watchdog.enabled``) or stopped."""
        mon = self._monitor()
        return mon._watchdog if mon is not None else None

    @property
    def rule_context(self) -> Any:
        """The :class:`~stethoscope.rules.base.RuleContext` every producer of this run shares (built once, on
        first use: the model is inspected then). Give it to a
        :class:`~stethoscope.rules.producer.FindingProducer` to report findings."""
        if self._rule_context is None:
            from stethoscope.rules.base import RuleContext

            self._rule_context = RuleContext.from_run(self)
        return self._rule_context

    @property
    def rules(self) -> tuple:
        """The rules the monitor runs, in their order."""
        mon = self._monitor()
        return tuple(mon._rules) if mon is not None else ()

    def extension(self, name: str) -> Any:
        """The running extension called ``name``, or None."""
        mon = self._monitor()
        return mon.extension(name) if mon is not None else None

    # ------------------------------------------------------------------ doing things
    def guard(self, where: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` under ``no_grad``; an exception becomes one ``monitor.error`` finding (returns None)."""
        mon = self._monitor()
        return mon._errors(where, fn, *args) if mon is not None else None

    def record_error(self, where: str, exc: BaseException) -> None:
        """Report ``exc`` raised by stethoscope's own code at ``where`` (once per place)."""
        mon = self._monitor()
        if mon is not None:
            mon._errors.record(where, exc)

    def gradient_norm(self, params: list[torch.Tensor]) -> float | None:
        """The total norm of ``params``' gradients from the rows the monitor read at this optimizer step's
        pre-hook, when it read exactly those in host memory (a sampled step on CPU), else None: a component
        that needs the norm there (incident capture) then spares reading every gradient a second time."""
        mon = self._monitor()
        return mon._gradients.host_grad_norm(params) if mon is not None else None

    def hooks(self, owner: str) -> HookSet:
        """A new :class:`HookSet` for ``owner``; the monitor removes it too when it lets go of the model."""
        hooks = HookSet(owner)
        mon = self._monitor()
        if mon is not None:
            mon._hook_sets.append(hooks)
        return hooks

    def queue(self, entry: Entry, row: torch.Tensor) -> None:
        """Queue a 1-D device row for this step's one transfer; the step record carries it back in
        ``record.extras[entry.kind]`` as ``(entry, host row)``."""
        mon = self._monitor()
        if mon is not None:
            mon._collector.add(entry, row)

    @property
    def metrics_capped(self) -> bool:
        """``metrics.jsonl`` reached ``storage.max_metrics_mb``: write only what must not be lost."""
        mon = self._monitor()
        return mon is None or mon._metrics.capped

    def write_metrics(self, row: dict) -> None:
        """Append one row to ``metrics.jsonl`` (it must carry ``schema_version``, ``step``, ``kind``, ``name``)."""
        mon = self._monitor()
        if mon is not None:
            mon._metrics.write_row(row)

    def flush_metrics(self) -> None:
        mon = self._monitor()
        if mon is not None:
            mon._metrics.flush()

    def write_meta(self, status: str, error: str | None = None) -> None:
        """Rewrite ``meta.json`` with ``status`` (``running`` / ``crashed`` / ``finished``)."""
        mon = self._monitor()
        if mon is not None:
            mon._write_meta(status, error)
