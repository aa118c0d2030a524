"""The Monitor: attaches to a model (and optimizer), samples steps, and turns statistics into findings.

One object drives everything (DESIGN.md's public surface)::

    mon = st.Monitor(model, optimizer=opt, run_dir="runs/exp1", config="stethoscope.yaml")
    for step, batch in enumerate(loader):
        with mon.step(step):
            loss = model(**batch).loss
            loss.backward()
            opt.step(); opt.zero_grad(set_to_none=True)
        mon.log(loss=loss)
    mon.close()

This module holds the step protocol; the work is done by a few pieces it owns (see docs/architecture.md):

* :class:`~stethoscope.monitor.forward.ForwardObserver` — forward hooks: the heartbeat on every step,
  activation statistics and input-finiteness flags on sampled steps;
* :class:`~stethoscope.monitor.gradients.GradientReader` — gradients (once per sampled step, unscaled) and
  update-to-weight ratios around the optimizer's step;
* :func:`~stethoscope.monitor.records.build_record` / :class:`~stethoscope.monitor.records.MetricsWriter` —
  the step's record from the host rows, and ``metrics.jsonl``;
* :class:`~stethoscope.monitor.meta.MetaWriter` — ``meta.json``;
* rules and extensions, built over the public :class:`~stethoscope.monitor.context.RunContext`.

Everything queued on a sampled step crosses to the host in one transfer per device when the step's record
is flushed, at the next step boundary or ``close()`` (so the loss logged after the ``with`` block rides
along).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stethoscope import rundir as rd
from stethoscope.collector import StepCollector
from stethoscope.config import Config, load_config
from stethoscope.console import get_console
from stethoscope.errors import CriticalFindingError, MonitorClosedError, MonitorUsageError
from stethoscope.findings import FindingLog
from stethoscope.heartbeat import Heartbeat
from stethoscope.hooks import HookSet
from stethoscope.monitor.context import RunContext
from stethoscope.monitor.engine import StatsEngine
from stethoscope.monitor.forward import ForwardObserver
from stethoscope.monitor.gradients import GradientReader
from stethoscope.monitor.guard import ErrorGuard
from stethoscope.monitor.meta import (
    MetaWriter,
    check_arguments,
    disabled_by_env,
    dist_rank,
    prepare_run_dir,
    write_outputs,
)
from stethoscope.monitor.pipeline import RecordPipeline
from stethoscope.monitor.records import MetricsWriter, scalar_value
from stethoscope.naming import make_filter, patterns
from stethoscope.sampling import Schedule, schedule_from_config


class Monitor:
    """Watches a model (and its optimizer) while it trains; see the module docstring for the flow.

    Args:
        model: the ``nn.Module`` to watch. Names in findings are spelled as its ``named_modules()`` /
            ``named_parameters()`` spell them, with wrapper prefixes (``module.``, ``_orig_mod.``) removed.
        optimizer: its optimizer, if any; gradients are then read at its step pre-hook and updates
            measured around its step. Without one, call :meth:`after_backward`.
        run_dir: where the run directory goes (default: a fresh ``stethoscope-runs/run-<time>``). A folder
            that is not empty is an error (:class:`~stethoscope.errors.RunDirError`) unless ``overwrite=True``
            or ``resume=True``.
        config: a path to a YAML file, a dict, or a :class:`~stethoscope.Config`.
        schedule: a ``step -> bool`` callable that overrides the config's ``sampling`` section.
        resume: continue the run directory (and the monitor state saved in it).
        overwrite: replace the run already in ``run_dir`` (a script run again): the files a monitor writes
            there are removed first, other files stay; a non-empty folder that holds no run is still refused.
        scaler: the ``torch.amp.GradScaler`` in use, if any, so gradients read before the scaler unscales
            them (in :meth:`after_backward`) are reported unscaled.

    ``STETHOSCOPE_DISABLE=1`` in the environment makes every method a no-op.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        run_dir: str | Path | None = None,
        config: Config | dict | str | Path | None = None,
        *,
        schedule: Schedule | None = None,
        resume: bool = False,
        scaler: Any = None,
        overwrite: bool = False,
    ):
        self.disabled = disabled_by_env()
        self._closed = False
        self._hook_sets: list[HookSet] = []
        self._rules: list[Any] = []
        self._extensions: list[Any] = []
        self._watchdog: Any = None
        if self.disabled:
            self.run_dir = None
            return
        check_arguments(model, optimizer, schedule)
        self.config = cfg = load_config(config)
        self.schedule: Schedule = schedule if schedule is not None else schedule_from_config(cfg.sampling)
        self.rank, self.world_size = dist_rank()
        self.run_dir, self._resumed = prepare_run_dir(run_dir, resume, self.rank, overwrite)

        self._model_ref: Callable[[], nn.Module | None] = weakref.ref(model)
        self._optimizer_ref: Callable[[], Any] = weakref.ref(optimizer) if optimizer is not None else _none
        self._scaler_given = scaler is not None
        self.heartbeat = Heartbeat()
        self._findings_writer = rd.JsonlWriter(self.run_dir / rd.FINDINGS)
        # held weakly: the watchdog thread keeps the finding log, and a running thread must not keep a
        # forgotten monitor (and its hooks) alive
        self.findings = FindingLog(self._findings_writer, rank=self.rank,
                                   on_open=_weak_method(self._on_finding_open))
        self._errors = ErrorGuard(self.findings, _weak_attr(self, "_step"))
        self._metrics = MetricsWriter(self.run_dir / rd.METRICS, cfg.storage.max_metrics_mb, self.findings)
        self._meta = MetaWriter(self.run_dir, self._resumed, cfg, self.schedule, self.rank, self.world_size)
        self._collector = StepCollector(cfg.stats.eps)
        self._console = get_console()
        self._pipeline = RecordPipeline(cfg, self._collector, self._metrics, self.findings, self._errors,
                                        self._console, self.run_dir, _weak_attr(self, "_epoch"),
                                        _weak_method(self.state_dict))
        guard = self._errors  # holds no reference to the monitor: hooks may keep it
        self._engine = engine = StatsEngine(cfg.stats, on_error=guard.record)
        self._profile = _profile(cfg)  # module times on sampled steps (profile.json), or None
        self._forward = ForwardObserver(self.heartbeat, engine, self._collector, cfg.stats.per_call, guard,
                                        self._profile)
        self._gradients = GradientReader(*_watched_params(model, cfg), engine, self._collector, guard, scaler)
        self._crash_error: str | None = None
        self._step: int | None = None
        self._last_step: int | None = None
        self._sampled = False
        self._epoch: int | None = None
        self._quiet = cfg.console.quiet

        hooks = HookSet("monitor")
        self._hook_sets.append(hooks)
        self._forward.attach(hooks, model, patterns(cfg.stats.modules))
        if optimizer is not None:
            self._gradients.attach_optimizer(hooks, optimizer)
        self.context = RunContext(self)
        from stethoscope.rules import default_rules

        self._rules += default_rules(self.context)  # before the state is loaded, so resumed rules get theirs
        from stethoscope.extensions import build_extensions

        self._extensions += build_extensions(self.context)
        self._pipeline.rules, self._pipeline.extensions = self._rules, self._extensions
        if self._resumed:
            state = rd.read_json(self.run_dir / rd.STATE)
            if state:
                self.load_state_dict(state)
        self._write_meta("running")
        if cfg.watchdog.enabled:
            from stethoscope.watchdog import Watchdog

            self._watchdog = Watchdog(
                self.heartbeat, self.findings, self.run_dir, cfg.watchdog,
                console=None if self._quiet else self._console,
                before_exit=_weak_method(self._write_meta, "crashed"),
            ).start()

    # ------------------------------------------------------------------ public facts
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_step(self) -> bool:
        """Whether a step is open (between ``begin_step``/``end_step`` or inside ``with mon.step``)."""
        return not self.disabled and self._step is not None

    @property
    def read_grads_at_optimizer_step(self) -> bool:
        """False when a framework reads gradients itself (``after_backward``) from a hook inside the
        optimizer's ``step()`` after its closure (Lightning): the step pre-hook then only snapshots."""
        return self._gradients.read_at_optimizer_step if not self.disabled else True

    @read_grads_at_optimizer_step.setter
    def read_grads_at_optimizer_step(self, value: bool) -> None:
        if not self.disabled:
            self._gradients.read_at_optimizer_step = bool(value)

    @property
    def crash_error(self) -> str | None:
        """The error that ended the last step (``"Type: message"``), None when it went through."""
        return None if self.disabled else self._crash_error

    @property
    def hooks_attached(self) -> int:
        """How many hooks stethoscope holds on the model and optimizer now (0 after ``close()``)."""
        return sum(len(h) for h in self._hook_sets)

    # ------------------------------------------------------------------ errors
    def record_error(self, where: str, exc: BaseException) -> None:
        """Report an exception raised by stethoscope's own code (or an integration's) at ``where``: one
        ``monitor.error`` finding per place, and training goes on."""
        if not self.disabled:
            self._errors.record(where, exc)

    def _on_finding_open(self, event: dict) -> None:
        self._pipeline.on_finding_open(event)

    # ------------------------------------------------------------------ the step protocol
    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Mark one optimizer step; decides sampling and keeps the heartbeat. Use as ``with mon.step(i):``."""
        if self.disabled:
            yield
            return
        self.begin_step(step)
        failed: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self._end_step(failed)

    def begin_step(self, step: int) -> None:
        """Open step ``step`` without a ``with`` block (framework callbacks); close it with :meth:`end_step`.

        Prefer ``with mon.step(i):`` in your own loop: it also sees an exception leaving the step.
        """
        if self.disabled:
            return
        self._entered_at = time.perf_counter()  # the step-time breakdown's boundary (RunContext.step_entered_at)
        if self._closed:
            raise MonitorClosedError("Monitor.step() was called after close(); create a new Monitor")
        if self._step is not None:
            raise MonitorUsageError(
                f"mon.step({step}) was entered inside mon.step({self._step}); steps cannot be nested"
            )
        self._flush()
        self._begin_step(int(step))

    def end_step(self, failed: BaseException | None = None) -> None:
        """Close the step opened by :meth:`begin_step` (``failed``: the exception that ended it, if any)."""
        if self.disabled or self._step is None:
            return
        self._end_step(failed)

    def _begin_step(self, step: int) -> None:
        self._step = step
        try:
            scheduled = bool(self.schedule(step))
        except Exception as exc:
            self._errors.record("schedule", exc)
            scheduled = False
        self._sampled = self._pipeline.take_anomaly() or scheduled
        self._gradients.begin_step(self._sampled, scheduled)
        self._forward.new_step()
        self._engine.new_step()
        hb = self.heartbeat
        hb.step = step
        hb.in_step = True
        hb.stack.clear()
        hb.step_started = hb.stamp = time.monotonic()
        self._forward.sampling = self._sampled and not hb.paused
        for ext in self._extensions:
            self._errors(f"extension {ext.name}", ext.begin_step, step, self._sampled)

    def _end_step(self, failed: BaseException | None) -> None:
        step, self._ending_at = self._step, time.perf_counter()
        try:
            missing = self._gradients.end_step()
            self._forward.end_step()
            if self._sampled and self._profile is not None:
                self._profile.end_step()
            self._pipeline.pending = {"step": step, "sampled": self._sampled, "missing": missing,
                                      "modes": self._forward.modes() if self._sampled else {}}
            self._engine.new_step()
            if failed is not None and not isinstance(failed, GeneratorExit):
                self._crash_error = f"{type(failed).__name__}: {failed}"
                self._write_meta("crashed", error=self._crash_error)
            else:
                self._crash_error = None  # a later step went through: the run did not end there
            for ext in self._extensions:
                self._errors(f"extension {ext.name}", ext.end_step, step, failed)
        finally:
            self._last_step = step
            self._step = None
            self.heartbeat.in_step = False
            self.heartbeat.stamp = time.monotonic()

    def after_backward(self) -> None:
        """Read gradients now (loops without an optimizer, or to read them before clipping)."""
        if self.disabled or self._closed:
            return
        if self._step is not None and self._gradients.active:
            self._errors("after_backward", self._gradients.read)

    def log(self, **scalars: Any) -> None:
        """Record scalars (floats or 0-dim tensors) for the current or just-finished step, without a sync."""
        if self.disabled:
            return
        if self._closed:
            raise MonitorClosedError("Monitor.log() was called after close()")
        for key, value in scalars.items():
            self._pipeline.scalars[key] = scalar_value(key, value)

    def epoch(self, n: int) -> None:
        """Mark the start of epoch ``n`` (memory and loss plots show the boundary)."""
        if self.disabled:
            return
        if self._closed:
            raise MonitorClosedError("Monitor.epoch() was called after close()")
        self._epoch = int(n)
        step = self._step if self._step is not None else self._last_step
        self._metrics.write_row({"schema_version": rd.SCHEMA_VERSION, "step": step, "kind": "marker",
                                 "name": "epoch", "value": int(n)})

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Evaluation, checkpointing: no statistics and no stall alarms inside this block."""
        if self.disabled:
            yield
            return
        hb = self.heartbeat
        was_paused, was_sampling = hb.paused, self._forward.sampling
        hb.paused = True
        self._forward.sampling = False
        try:
            yield
        finally:
            hb.paused = was_paused
            self._forward.sampling = was_sampling
            hb.stamp = time.monotonic()

    # ------------------------------------------------------------------ flushing a step's record
    def flush(self) -> None:
        """Write the finished step's record now instead of at the next step boundary.

        Normally unnecessary (the next ``step()`` or ``close()`` flushes); useful before reading the run
        directory from another process, or to time a step together with its statistics.
        """
        if self.disabled or self._closed:
            return
        if self._step is not None:
            raise MonitorUsageError("flush() inside a step: call it after the `with mon.step(...)` block")
        self._flush()

    def _flush(self, final: bool = False) -> None:
        self._pipeline.flush(self._last_step, final)

    # ------------------------------------------------------------------ state and meta
    def state_dict(self) -> dict:
        """Everything needed to continue this monitor in a new process (``resume=True`` loads it)."""
        if self.disabled:
            return {}
        return {
            "schema_version": rd.SCHEMA_VERSION,
            "last_step": self._last_step,
            "epoch": self._epoch,
            **self._pipeline.state_dict(),
            "findings": self.findings.state_dict(),
            "gradients": self._gradients.state_dict(),
            "rules": {getattr(r, "name", type(r).__name__): r.state_dict() for r in self._rules},
            "extensions": {e.name: e.state_dict() for e in self._extensions},
        }

    def load_state_dict(self, state: dict) -> None:
        if self.disabled:
            return
        self._last_step = state.get("last_step")
        self._epoch = state.get("epoch")
        self._pipeline.load_state_dict(state)
        self.findings.load_state_dict(state.get("findings", {}))
        self._gradients.load_state_dict(state.get("gradients", {}))
        rule_states = state.get("rules", {})
        for rule in self._rules:
            key = getattr(rule, "name", type(rule).__name__)
            if key in rule_states:
                rule.load_state_dict(rule_states[key])
        ext_states = state.get("extensions", {})
        for ext in self._extensions:
            if ext.name in ext_states:
                ext.load_state_dict(ext_states[ext.name])

    def _write_meta(self, status: str, error: str | None = None) -> None:
        if error is None and status == "crashed":  # close(status="crashed") keeps the step's error
            error = self._crash_error
        if error is not None:
            self._crash_error = error
        self._meta.write(status, last_step=self._last_step, model=self._model_ref(),
                         optimizer=self._optimizer_ref(), verdict=self.findings.verdict(), error=error)

    # ------------------------------------------------------------------ extensions
    def add_extension(self, ext: Any) -> None:
        """Drive ``ext`` (an :class:`~stethoscope.extensions.Extension`) from now on, after the built-in ones.

        For integrations that need the step moments of a monitor they did not build; its name must be new.
        """
        if self.disabled:
            return
        if self._closed:
            raise MonitorClosedError("Monitor.add_extension() was called after close()")
        if self.extension(getattr(ext, "name", "")) is not None:
            raise MonitorUsageError(f"an extension named {ext.name!r} is already attached")
        self._extensions.append(ext)

    def extension(self, name: str) -> Any:
        """The running extension called ``name`` (see :mod:`stethoscope.extensions`), or ``None``."""
        for ext in self._extensions:
            if ext.name == name:
                return ext
        return None

    # ------------------------------------------------------------------ closing
    def close(self, status: str | None = None, error: str | None = None) -> None:
        """Flush, run the final checks, write meta/report, and remove every hook. Safe to call twice.

        ``status`` defaults to "crashed" when the last step raised (e.g. ``close()`` in a ``finally``),
        else "finished". ``error`` is written as ``meta.json``'s ``error`` of a crashed run (default: the
        exception that ended the last step).
        """
        if self.disabled or self._closed:
            self._closed = True
            return
        if error is not None:
            self._crash_error = error
        if status is None:
            status = "crashed" if self._crash_error else "finished"
        self._closed = True
        stop_error = None
        if self._watchdog is not None:  # before the findings file closes; a resolved stall is closed
            self._errors("stopping the watchdog", self._watchdog.stop, status != "crashed")
        if self._profile is not None and self._profile.steps:
            self._errors("writing profile.json", self._profile.write, self.run_dir)
        try:
            try:
                self._flush(final=True)
            except CriticalFindingError as err:
                stop_error = err
            for rule in self._rules:
                self._errors(f"rule {getattr(rule, 'name', type(rule).__name__)}", _finish_rule, rule,
                             self._last_step)
            for ext in self._extensions:
                self._errors(f"extension {ext.name}", ext.close, status)
            self._errors("saving monitor state", self._pipeline.save_state)
            self._write_meta(status)
        finally:
            self._detach()
            self._metrics.close()
            self._findings_writer.close()
        write_outputs(self.run_dir, self.config, self._console)
        if stop_error is not None:
            raise stop_error

    def _detach(self) -> None:
        """Let go of the model: stop the watchdog, remove every hook, drop every tensor reference."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            with contextlib.suppress(Exception):
                watchdog.stop(resolve=False)
        for hooks in self._hook_sets:
            hooks.remove()
        if self.disabled:
            return
        self._gradients.detach()
        self._forward.clear()
        self._engine.new_step()
        self._collector.clear()
        self._model_ref = _none
        self._optimizer_ref = _none
        for rule in self._rules:
            with contextlib.suppress(Exception):
                rule.detach()
        for ext in self._extensions:
            with contextlib.suppress(Exception):
                ext.detach()
        for hooks in self._hook_sets:  # what a failing extension detach left behind
            hooks.remove()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:  # including a CriticalFindingError from stop_on: the run ended there
            with contextlib.suppress(CriticalFindingError):
                self.close(status="crashed", error=f"{type(exc).__name__}: {exc}")
        else:
            self.close()

    def __del__(self) -> None:  # hooks must not outlive a forgotten monitor
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self._detach()


def _none() -> None:
    return None


def _finish_rule(rule: Any, last_step: int | None) -> None:
    """A rule's last word at close, written like every other (through its ``settle``)."""
    rule.finish(last_step)
    settle = getattr(rule, "settle", None)
    if callable(settle):
        settle(last_step)


def _profile(cfg: Config) -> Any:
    if not cfg.trace.profile:
        return None
    from stethoscope.trace import ModuleProfile

    return ModuleProfile()


def _weak_attr(obj: Any, attr: str) -> Callable[[], Any]:
    """Reads ``obj.attr`` through a weak reference (None once ``obj`` is gone)."""
    ref = weakref.ref(obj)
    return lambda: getattr(ref(), attr, None)


def _watched_params(model: nn.Module, cfg: Config) -> tuple[list, list]:
    """(parameters whose gradients are read, those whose updates are measured), by clean name."""
    grad_filter = make_filter(patterns(cfg.stats.parameters))
    update_filter = make_filter(patterns(cfg.stats.update_ratio))
    grads: list[tuple[str, nn.Parameter]] = []
    updates: list[tuple[str, nn.Parameter]] = []
    from stethoscope.distributed.sharded import watched_parameters

    for name, p in watched_parameters(model):  # FSDP-sharded ones as full parameters, by clean name
        if not p.requires_grad:
            continue
        if grad_filter(name):
            grads.append((name, p))
        if update_filter(name):
            updates.append((name, p))
    return grads, updates


def _weak_method(method: Callable, *bound: Any) -> Callable:
    """``method`` (with leading ``bound`` arguments) called through a weak reference to its object: a no-op
    once the object is gone. For callbacks handed to threads and logs that may outlive a forgotten monitor."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> Any:
        fn = ref()
        return None if fn is None else fn(*bound, *args, **kwargs)

    return call
