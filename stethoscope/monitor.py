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

Where the work happens, and why there:

* forward hooks (all modules): stamp the heartbeat on every step; on sampled steps queue device-side
  statistics of the outputs (and of the inputs of linear layers), and whether the inputs were finite;
* gradients: read once per sampled step at the first of ``after_backward()``, the optimizer's step
  pre-hook, ``optimizer.zero_grad`` or the end of the step — so a step a ``GradScaler`` skips (its grads
  are non-finite and the optimizer never runs) is still read, already unscaled by the scaler;
* update-to-weight ratios: a copy of the selected parameters at the step pre-hook, compared at the
  post-hook;
* everything queued crosses to the host in one transfer per device when the step's record is flushed,
  at the next step boundary or ``close()`` (so the loss logged after the ``with`` block rides along).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stethoscope import __version__
from stethoscope import rundir as rd
from stethoscope.collector import AsyncScalars, Entry, StepCollector, merge_stats
from stethoscope.config import Config, load_config, patterns
from stethoscope.console import SEVERITY_STYLE, get_console
from stethoscope.errors import CriticalFindingError, MonitorClosedError, MonitorUsageError
from stethoscope.findings import FindingLog
from stethoscope.flatten import iter_float_tensors
from stethoscope.heartbeat import Heartbeat
from stethoscope.naming import clean_name, make_filter
from stethoscope.record import ActRecord, GradRecord, StepRecord, UpdateRecord
from stethoscope.sampling import Schedule, SpikeDetector, schedule_from_config
from stethoscope.stats import RAW_WIDTH, CompiledStats, Scratch, tensor_stats

_LINEAR_TYPES = ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear", "LazyLinear", "Bilinear")


def _is_compiling() -> bool:
    """True while torch.compile traces (hooks then return at once, so they add no graph breaks)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _disabled_by_env() -> bool:
    return os.environ.get("STETHOSCOPE_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _dist_rank() -> tuple[int | None, int]:
    """(rank, world size) when torch.distributed is initialised with more than one process."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - exotic builds
        pass
    return None, 1


def _default_run_dir() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("stethoscope-runs") / f"run-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's contents within a step (same storage, view and version)."""
    try:
        return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
    except Exception:  # tensors without storage (e.g. some subclasses): never deduplicated
        return (id(t), None)


class Monitor:
    """Watches a model (and its optimizer) while it trains; see the module docstring for the flow.

    Args:
        model: the ``nn.Module`` to watch. Names in findings are spelled as its ``named_modules()`` /
            ``named_parameters()`` spell them, with wrapper prefixes (``module.``, ``_orig_mod.``) removed.
        optimizer: its optimizer, if any; gradients are then read at its step pre-hook and updates
            measured around its step. Without one, call :meth:`after_backward`.
        run_dir: where the run directory goes (default: ``stethoscope-runs/run-<time>``). A non-empty
            folder is an error unless ``resume=True``.
        config: a path to a YAML file, a dict, or a :class:`~stethoscope.Config`.
        schedule: a ``step -> bool`` callable that overrides the config's ``sampling`` section.
        resume: continue the run directory (and the monitor state saved in it).
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
    ):
        self.disabled = _disabled_by_env()
        self._closed = False
        if self.disabled:
            self.run_dir = None
            return
        if not isinstance(model, nn.Module):
            raise MonitorUsageError(
                f"Monitor needs a torch.nn.Module as model, got {type(model).__name__}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise MonitorUsageError(
                f"optimizer must be a torch.optim.Optimizer (or None), got {type(optimizer).__name__}"
            )
        if schedule is not None and not callable(schedule):
            raise MonitorUsageError(f"schedule must be a callable step -> bool, got {schedule!r}")
        self.config = load_config(config)
        cfg = self.config
        self.schedule: Schedule = schedule if schedule is not None else schedule_from_config(cfg.sampling)
        self.rank, self.world_size = _dist_rank()
        base = Path(run_dir) if run_dir is not None else _default_run_dir()
        if self.rank is not None:
            base = base / f"rank{self.rank}"
        self.run_dir = rd.prepare(base, resume)
        self._resumed = resume and (self.run_dir / rd.META).is_file()

        self._model_ref = weakref.ref(model)
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._scaler_ref = weakref.ref(scaler) if scaler is not None else None
        self.heartbeat = Heartbeat()
        self._collector = StepCollector(cfg.stats.eps)
        self._async = AsyncScalars()  # logged CUDA scalars of unsampled steps, read without a stall
        self._compiled = CompiledStats(on_error=self._record_error)
        self._scratch = Scratch()  # work buffers reused by every statistic (3 x 2 MiB per device at most)
        self._metrics = rd.JsonlWriter(self.run_dir / rd.METRICS)
        self._findings_writer = rd.JsonlWriter(self.run_dir / rd.FINDINGS)
        # held weakly: the watchdog thread keeps the finding log, and a running thread must not keep a
        # forgotten monitor (and its hooks) alive
        self.findings = FindingLog(self._findings_writer, rank=self.rank,
                                   on_open=_weak_method(self._on_finding_open))
        self._stop_error: CriticalFindingError | None = None
        self._state_saved = (-1, -math.inf)  # (finding events, monotonic time) at the last state.json write
        self._loss_spikes = SpikeDetector(cfg.stats.loss_spike)
        self._grad_spikes = SpikeDetector(cfg.stats.grad_norm_spike)
        self._anomaly_left = 0
        self._errors_seen: set[str] = set()
        self._metrics_capped = False
        self._handles: list[Any] = []
        self._step: int | None = None
        self._last_step: int | None = None
        self._sampled = False
        self._sampling_now = False  # inside a sampled step and not paused: hooks compute statistics
        self._grads_read = False
        # False when a framework callback calls after_backward() itself from a hook that runs inside the
        # optimizer's step() after its closure (Lightning): the step pre-hook then only snapshots for updates
        self.read_grads_at_optimizer_step = True
        self._grad_marks: list = []  # per watched parameter: (weakref to its grad, version) at step start
        self._scaler_states: Any = None  # the GradScaler's per-optimizer states at step start
        self._calls: dict[str, int] = {}
        self._dedup: dict[tuple, tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self._sums: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}  # input sums of the step, per tensor
        self._missing: list[str] = []
        self._update_snapshot: list[tuple[torch.device, list[str], list[torch.Tensor], list]] = []
        self._pending: dict | None = None  # the last step's record, waiting for its flush
        self._pending_scalars: dict[str, Any] = {}
        self._epoch: int | None = None
        self._rules: list[Any] = []
        self._extensions: list[Any] = []
        self._started = _dt.datetime.now(_dt.UTC)
        self._console = get_console()
        self._quiet = cfg.console.quiet
        self._logged_lines = 0
        self._profile = None
        if cfg.trace.profile:
            from stethoscope.trace import ModuleProfile

            self._profile = ModuleProfile()  # module times on sampled steps (profile.json)
        self._watchdog = None

        self._param_names = {}
        grad_filter = make_filter(patterns(cfg.stats.parameters))
        update_filter = make_filter(patterns(cfg.stats.update_ratio))
        self._grad_params: list[tuple[str, nn.Parameter]] = []
        self._update_params: list[tuple[str, nn.Parameter]] = []
        for raw_name, p in model.named_parameters():
            name = clean_name(raw_name)
            if not p.requires_grad:
                continue
            if grad_filter(name):
                self._grad_params.append((name, p))
            if update_filter(name):
                self._update_params.append((name, p))

        self._attach_modules(model)
        if optimizer is not None:
            self._attach_optimizer(optimizer)
        from stethoscope.rules import default_rules

        self._rules = default_rules(self)  # before the state is loaded, so resumed rules get theirs
        from stethoscope.extensions import build_extensions

        self._extensions = build_extensions(self)
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

    # ------------------------------------------------------------------ attaching
    def _attach_modules(self, model: nn.Module) -> None:
        cfg = self.config.stats
        stat_filter = make_filter(patterns(cfg.modules))
        seen: set[str] = set()
        for raw_name, module in model.named_modules():
            name = clean_name(raw_name)
            if name in seen:  # a wrapper's inner module (``module``, ``_orig_mod``): the outer one is hooked
                continue
            seen.add(name)
            wants_stats = stat_filter(name) if name else stat_filter("")
            is_linear = type(module).__name__ in _LINEAR_TYPES or isinstance(module, nn.Linear)
            self._handles.append(module.register_forward_pre_hook(
                self._make_pre_hook(name, wants_stats, is_linear), with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                self._make_post_hook(name, wants_stats), with_kwargs=True, always_call=True))

    def _attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._handles.append(optimizer.register_step_pre_hook(self._optimizer_pre_hook))
        self._handles.append(optimizer.register_step_post_hook(self._optimizer_post_hook))
        original = optimizer.zero_grad  # bound method; restored on close
        monitor_ref = weakref.ref(self)

        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            mon = monitor_ref()
            # Only a zero_grad after this step's backward: one at the top of the loop would read last
            # step's gradients (or none) and hide the real ones from the optimizer pre-hook.
            if (mon is not None and mon._sampled and not mon._grads_read and mon._step is not None
                    and mon._grads_changed()):
                mon._guard("zero_grad", mon._read_grads)
            return original(*args, **kwargs)

        optimizer.zero_grad = zero_grad  # type: ignore[method-assign]
        self._zero_grad_patched = optimizer

    def _make_pre_hook(self, name: str, wants_stats: bool, is_linear: bool) -> Callable:
        hb = self.heartbeat
        ref = weakref.ref(self)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if _is_compiling():  # inside a torch.compile'd region: stay out of the graph
                return None
            hb.enter(name)
            mon = ref()
            if mon is None or not mon._sampling_now:
                return None
            prof = mon._profile
            if not wants_stats:
                if prof is not None:
                    prof.enter(name, hb.stamp)
                return None
            mon._guard(f"forward pre-hook of {name or '<model>'}", mon._on_inputs, name, args, kwargs,
                       is_linear)
            if prof is not None:  # the statistics' own time is not the module's
                now = time.monotonic()
                prof.discount(now - hb.stamp)
                prof.enter(name, now)
            return None

        return pre_hook

    def _make_post_hook(self, name: str, wants_stats: bool) -> Callable:
        hb = self.heartbeat
        ref = weakref.ref(self)

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if _is_compiling():
                return None
            hb.exit(name)
            mon = ref()
            if mon is None or not mon._sampling_now:
                return None
            prof = mon._profile
            if prof is not None:
                prof.exit(name, hb.stamp)
            if not wants_stats:
                return None
            mon._guard(f"forward hook of {name or '<model>'}", mon._on_output, name, output)
            if prof is not None:
                prof.discount(time.monotonic() - hb.stamp)
            return None

        return post_hook

    # ------------------------------------------------------------------ hook bodies (sampled steps)
    def _guard(self, where: str, fn: Callable, *args: Any) -> Any:
        """Run a hook body; an exception becomes one ``monitor.error`` finding and training goes on."""
        try:
            with torch.no_grad():
                return fn(*args)
        except CriticalFindingError:
            raise
        except Exception as exc:  # never break the training we watch
            self._record_error(where, exc)
            return None

    def _record_error(self, where: str, exc: BaseException) -> None:
        if where in self._errors_seen:
            return
        self._errors_seen.add(where)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=6))
        with contextlib.suppress(Exception):  # the findings file itself failed
            self.findings.report(
                "monitor.error", where, "warning", None, None,
                f"stethoscope's own code raised {type(exc).__name__}: {exc} (in {where}); "
                "training continues without that measurement",
                "this is a stethoscope bug, not a problem in your model: please report it with the "
                "traceback in this finding's `data.traceback`. To skip a module meanwhile, leave it out of "
                "stats.modules (a list of patterns or a predicate)",
                self._step, data={"traceback": tb, "exception": type(exc).__name__},
            )

    def _stats_row(self, t: torch.Tensor, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = _tensor_key(t)
        cached = self._dedup.get(key)
        # a dead tensor's memory may have been reused; a row cached without features cannot serve one with
        if cached is not None and cached[0]() is not None and (not features or cached[1][1] is not None):
            return cached[1]
        feats: list[torch.Tensor] = []
        with torch.autocast(t.device.type, enabled=False) if t.device.type in ("cuda", "cpu") else \
                contextlib.nullcontext():
            row = self._compute_stats(t, features, feats)
        result = (row, feats[0] if feats else None)
        self._dedup[key] = (weakref.ref(t), result)
        return result

    def _compute_stats(self, t: torch.Tensor, features: bool, feats: list | None) -> torch.Tensor:
        """The eager engine, or the compiled one where ``stats.compile`` asks for it (see CompiledStats)."""
        cfg = self.config.stats
        mode = cfg.compile
        if mode == "always" or (mode == "auto" and t.device.type == "cuda"):
            return self._compiled(t, cfg.eps, cfg.saturation, features, feats, self._scratch)
        return tensor_stats(t, cfg.eps, cfg.saturation, features=features, feature_absmax=feats,
                            scratch=self._scratch)

    def _on_inputs(self, name: str, args: tuple, kwargs: dict, is_linear: bool) -> None:
        tensors = [t for _, t in iter_float_tensors((args, kwargs))]
        if not tensors:
            self._input_flags.setdefault(name, []).append(None)
            return
        # A finite sum proves every entry finite: one device scalar (the sum of the inputs' sums), no host
        # read; the host reads a non-finite flag as "an input was not finite".
        if len(tensors) == 1:
            flag = self._input_sum(tensors[0])
        else:
            device = tensors[0].device
            flag = torch.cat([self._input_sum(t).to(device) for t in tensors]).sum().reshape(1)
        # a stack per name: a module that calls itself keeps each call's own flag
        self._input_flags.setdefault(name, []).append(flag)
        if is_linear:
            x = tensors[0]
            features = x.dim() >= 2
            row, per_feature = self._stats_row(x, features=features)
            self._collector.add(
                Entry("input", name, "", self._calls.get(name, 0), x.numel(),
                      x.shape[-1] if features else 0), row)
            if per_feature is not None and not self.config.stats.per_call:
                self._collector.add_feature_absmax(("input", name, ""), per_feature)

    def _input_sum(self, t: torch.Tensor) -> torch.Tensor:
        """(1,) float32 sum of ``t``, once per tensor and step: a hidden state feeds several modules."""
        key = _tensor_key(t)
        hit = self._sums.get(key)
        if hit is not None and hit[0]() is not None:
            return hit[1]
        s = t.detach().sum(dtype=torch.float32).reshape(1)
        self._sums[key] = (weakref.ref(t), s)
        return s

    def _on_output(self, name: str, output: Any) -> None:
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        stack = self._input_flags.get(name)
        flag = stack.pop() if stack else None
        for path, t in iter_float_tensors(output):
            features = t.dim() >= 2
            row, per_feature = self._stats_row(t, features)
            entry = Entry("act", name, path, call, t.numel(), t.shape[-1] if features else 0)
            if flag is None:  # no floating input: nothing to blame upstream
                self._collector.add(entry, row)
            else:  # (RAW_WIDTH + 1,) at the host: the row, then the inputs' flag
                self._collector.add(entry, row, flag.to(row.device))
            if per_feature is not None and not self.config.stats.per_call:
                self._collector.add_feature_absmax(("act", name, path), per_feature)

    def _inverse_scale(self) -> torch.Tensor | None:
        """1/scale when a GradScaler is in use and has not unscaled this optimizer's grads yet."""
        scaler = self._scaler_ref() if self._scaler_ref is not None else None
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return None
        opt = self._optimizer_ref() if self._optimizer_ref is not None else None
        try:
            from torch.amp.grad_scaler import OptState

            states = scaler._per_optimizer_states
            if states is not self._scaler_states:
                return None  # scaler.update() ran in this step (it resets the states): already unscaled
            state = states.get(id(opt)) if opt is not None else None
            if state is not None and state["stage"] is not OptState.READY:
                return None  # already unscaled (or stepped)
            scale = scaler._scale
        except Exception:
            return None
        if scale is None:
            return None
        return scale.double().reciprocal().float()

    def _grad_marks_now(self) -> list:
        """Which gradient tensor each watched parameter holds now, and its version (no host sync)."""
        return [None if (g := p.grad) is None else (weakref.ref(g), g._version) for _, p in self._grad_params]

    def _grads_changed(self) -> bool:
        """True when a backward pass has written a gradient since the step began."""
        for (_, p), mark in zip(self._grad_params, self._grad_marks, strict=False):
            g = p.grad
            if g is not None and (mark is None or mark[0]() is not g or mark[1] != g._version):
                return True
        return False

    def _read_grads(self) -> None:
        if self._grads_read:
            return
        self._grads_read = True
        inv = self._inverse_scale()
        for name, p in self._grad_params:
            g = p.grad
            if g is None:
                self._missing.append(name)
                continue
            if g.is_sparse:
                g = g.coalesce().values()
            if inv is not None:
                g = g.float() * inv.to(g.device)
            with torch.autocast(g.device.type, enabled=False) if g.device.type in ("cuda", "cpu") else \
                    contextlib.nullcontext():
                row = self._compute_stats(g, False, None)
            self._collector.add(Entry("grad", name, "", 0, g.numel()), row)

    def _optimizer_pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._sampled or self._step is None:
            return
        self._guard("optimizer step pre-hook", self._before_optimizer_step)

    def _before_optimizer_step(self) -> None:
        # A closure optimizer (LBFGS; Lightning in fp32) enters step() before its forward and backward run:
        # the gradients are read only once a backward has written them (else after_backward or the step's end)
        if self.read_grads_at_optimizer_step and self._grads_changed():
            self._read_grads()
        self._update_snapshot = []
        if not self._update_params:
            return
        groups: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
        for name, p in self._update_params:
            names, params = groups.setdefault(p.device, ([], []))
            names.append(name)
            params.append(p.detach())
        for device, (names, params) in groups.items():
            copies = [p.clone() for p in params]
            norms = torch._foreach_norm(copies)
            self._update_snapshot.append((device, names, copies, norms))

    def _optimizer_post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._update_snapshot:
            return
        self._guard("optimizer step post-hook", self._after_optimizer_step)

    def _after_optimizer_step(self) -> None:
        by_name = dict(self._update_params)
        for _device, names, copies, weight_norms in self._update_snapshot:
            current = [by_name[n].detach() for n in names]
            torch._foreach_sub_(copies, current)  # copies = w_before - w_after = -Δw
            delta_norms = torch._foreach_norm(copies)
            row = torch.cat([
                torch.stack([d.float() for d in delta_norms]),
                torch.stack([w.float() for w in weight_norms]),
            ])  # (2P,): ‖Δw‖ then ‖w‖ for each parameter
            self._collector.add(Entry("update", "", "", 0, len(names), extra={"names": names}), row)
        self._update_snapshot = []

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

    @property
    def in_step(self) -> bool:
        """Whether a step is open (between ``begin_step``/``end_step`` or inside ``with mon.step``)."""
        return not self.disabled and self._step is not None

    def _begin_step(self, step: int) -> None:
        self._step = step
        try:
            scheduled = bool(self.schedule(step))
        except Exception as exc:
            self._record_error("schedule", exc)
            scheduled = False
        self._sampled = scheduled or self._anomaly_left > 0
        if self._anomaly_left > 0:
            self._anomaly_left -= 1
        self._grads_read = False
        self._grad_marks = self._grad_marks_now() if self._sampled else []
        scaler = self._scaler_ref() if self._scaler_ref is not None else None
        self._scaler_states = getattr(scaler, "_per_optimizer_states", None)
        self._calls = {}
        self._dedup = {}
        self._sums = {}
        self._input_flags: dict[str, list[torch.Tensor | None]] = {}
        self._missing = []
        self._update_snapshot = []
        hb = self.heartbeat
        hb.step = step
        hb.in_step = True
        hb.stack.clear()
        hb.step_started = hb.stamp = time.monotonic()
        self._sampling_now = self._sampled and not hb.paused
        for ext in self._extensions:
            self._guard(f"extension {ext.name}", ext.begin_step, step, self._sampled)

    def _end_step(self, failed: BaseException | None) -> None:
        step = self._step
        try:
            if self._sampled and not self._grads_read:
                self._guard("reading gradients at the end of the step", self._read_grads)
            self._sampling_now = False
            if self._sampled and self._profile is not None:
                self._profile.end_step()
            self._pending = {"step": step, "sampled": self._sampled, "missing": list(self._missing)}
            self._dedup = {}
            self._sums = {}
            if failed is not None and not isinstance(failed, GeneratorExit):
                self._crash_error = f"{type(failed).__name__}: {failed}"
                self._write_meta("crashed", error=self._crash_error)
            else:
                self._crash_error = None  # a later step went through: the run did not end there
            for ext in self._extensions:
                self._guard(f"extension {ext.name}", ext.end_step, step, failed)
        finally:
            self._last_step = step
            self._step = None
            self.heartbeat.in_step = False
            self.heartbeat.stamp = time.monotonic()

    def after_backward(self) -> None:
        """Read gradients now (loops without an optimizer, or to read them before clipping)."""
        if self.disabled or self._closed:
            return
        if self._step is not None and self._sampled:
            self._guard("after_backward", self._read_grads)

    def log(self, **scalars: Any) -> None:
        """Record scalars (floats or 0-dim tensors) for the current or just-finished step, without a sync."""
        if self.disabled:
            return
        if self._closed:
            raise MonitorClosedError("Monitor.log() was called after close()")
        for key, value in scalars.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise MonitorUsageError(
                        f"mon.log({key}=...) needs a number or a one-element tensor, got shape "
                        f"{tuple(value.shape)}"
                    )
                value = value.detach().reshape(())
            elif not isinstance(value, int | float | np.floating | np.integer):
                raise MonitorUsageError(
                    f"mon.log({key}=...) needs a number or a one-element tensor, got {type(value).__name__}"
                )
            self._pending_scalars[key] = value

    def epoch(self, n: int) -> None:
        """Mark the start of epoch ``n`` (memory and loss plots show the boundary)."""
        if self.disabled:
            return
        if self._closed:
            raise MonitorClosedError("Monitor.epoch() was called after close()")
        self._epoch = int(n)
        step = self._step if self._step is not None else self._last_step
        self._metrics.write({"schema_version": rd.SCHEMA_VERSION, "step": step, "kind": "marker",
                             "name": "epoch", "value": int(n)})

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Evaluation, checkpointing: no statistics and no stall alarms inside this block."""
        if self.disabled:
            yield
            return
        hb = self.heartbeat
        was_paused, was_sampling = hb.paused, self._sampling_now
        hb.paused = True
        self._sampling_now = False
        try:
            yield
        finally:
            hb.paused = was_paused
            self._sampling_now = was_sampling
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
        """Bring the pending step's rows and scalars to the host, write them, run the rules.

        An unsampled step whose only device data are logged CUDA scalars is not waited for: its values
        travel through :class:`AsyncScalars` and are processed once they have arrived (``final`` waits).
        """
        pending, self._pending = self._pending, None
        scalars, self._pending_scalars = self._pending_scalars, {}
        if pending is None and not scalars:
            self._process_async(block=final)
            return
        step = pending["step"] if pending is not None else self._last_step
        tensor_scalars = [(k, v) for k, v in scalars.items() if isinstance(v, torch.Tensor)]
        values = {k: float(v) for k, v in scalars.items() if not isinstance(v, torch.Tensor)}
        sampled = bool(pending and pending["sampled"])
        if (not sampled and not final and tensor_scalars and len(self._collector) == 0
                and all(v.device.type == "cuda" for _, v in tensor_scalars)):
            try:
                self._async.submit(step, pending, [k for k, _ in tensor_scalars],
                                   [v for _, v in tensor_scalars], values)
            except Exception as exc:
                self._record_error("queueing logged scalars", exc)
            self._process_async(block=False)
            return
        self._process_async(block=True)  # earlier steps first, so records stay in step order
        for k, v in tensor_scalars:
            self._collector.add(Entry("scalar", k, "", 0, 1), v.to(torch.float32).reshape(1))
        try:
            entries, rows, dead = self._collector.fetch()
        except Exception as exc:
            self._record_error("reading statistics back from the device", exc)
            entries, rows, dead = [], [], {}
        self._process(self._build_record(step, pending, entries, rows, dead, values))

    def _process_async(self, block: bool) -> None:
        if len(self._async):
            for step, pending, values in self._async.ready(block):
                self._process(self._build_record(step, pending, [], [], {}, values))

    def _process(self, record: StepRecord) -> None:
        """Write a step's record, check anomalies, run the rules, print its line."""
        self._guard("writing metrics", self._write_record, record)
        self._guard("checking anomalies", self._check_anomalies, record)
        for rule in self._rules:
            self._guard(f"rule {getattr(rule, 'name', type(rule).__name__)}", rule.observe, record)
        for ext in self._extensions:
            self._guard(f"extension {ext.name}", ext.observe, record)
        self._print_line(record)
        if record.sampled and self._state_due():
            self._guard("saving monitor state", self._save_state)
        if self._stop_error is not None:
            err, self._stop_error = self._stop_error, None
            raise err

    def _build_record(self, step, pending, entries, rows, dead, values) -> StepRecord:
        record = StepRecord(step=step, sampled=bool(pending and pending["sampled"]), epoch=self._epoch)
        record.missing_grads = list(pending["missing"]) if pending else []
        per_call = self.config.stats.per_call
        act_groups: dict[tuple, list] = {}
        order: list[tuple] = []
        for entry, row in zip(entries, rows, strict=True):
            if row is None:
                continue
            if entry.kind == "scalar":
                values[entry.name] = float(row[0])
            elif entry.kind in ("act", "input"):
                key = (entry.kind, entry.name, entry.output, entry.call if per_call else 0)
                if key not in act_groups:
                    act_groups[key] = []
                    order.append(key)
                act_groups[key].append((entry, row))
                if entry.kind == "act":
                    finite_in = not (row.shape[0] > RAW_WIDTH and not math.isfinite(row[RAW_WIDTH]))
                    record.act_calls.append((entry.name, entry.output, entry.call,
                                             float(row[0]), finite_in))
            elif entry.kind == "grad":
                st = merge_stats([(row[:RAW_WIDTH], entry.count)], 0, None)
                record.grads[entry.name] = GradRecord(entry.name, st)
            elif entry.kind == "update":
                names = entry.extra["names"]
                n = len(names)
                for i, name in enumerate(names):
                    dn, wn = float(row[i]), float(row[n + i])
                    ratio = dn / wn if wn > 0 else (math.inf if dn > 0 else 0.0)
                    record.updates[name] = UpdateRecord(name, dn, wn, ratio)
            else:  # a kind an extension queued (e.g. attn): handed over as it came
                record.extras.setdefault(entry.kind, []).append((entry, row))
        for key in order:
            kind, name, output, call = key
            group = act_groups[key]
            first = group[0][0]
            parts = [(row[:RAW_WIDTH], e.count) for e, row in group]
            dead_count = None if per_call else dead.get((kind, name, output))
            st = merge_stats(parts, first.features, dead_count)
            rec = ActRecord(name, output, len(group), st, call if per_call else None)
            (record.acts if kind == "act" else record.inputs)[(name, output, rec.call)] = rec
        record.scalars = values
        return record

    def _write_record(self, record: StepRecord) -> None:
        w = self._metrics
        base = {"schema_version": rd.SCHEMA_VERSION, "step": record.step}
        for name, value in record.scalars.items():
            w.write(base | {"kind": "scalar", "name": name, "value": value})
        capped = w.bytes > self.config.storage.max_metrics_mb * 1e6
        if capped and not self._metrics_capped:
            self._metrics_capped = True
            self.findings.report(
                "monitor.storage", "metrics.jsonl", "info", round(w.bytes / 1e6, 1),
                self.config.storage.max_metrics_mb,
                "metrics.jsonl reached storage.max_metrics_mb; from now on only scalar rows are written",
                "raise storage.max_metrics_mb, sample less often (sampling.every), or narrow "
                "stats.modules / stats.parameters", record.step)
        if not capped:
            for rec in record.acts.values():
                w.write(base | {"kind": "act", "name": rec.name, "output": rec.output, "calls": rec.calls,
                                **({"call": rec.call} if rec.call is not None else {}),
                                **rec.stats.as_dict()})
            for rec in record.inputs.values():
                w.write(base | {"kind": "input", "name": rec.name, "calls": rec.calls,
                                **({"call": rec.call} if rec.call is not None else {}),
                                **rec.stats.as_dict()})
            for rec in record.grads.values():
                w.write(base | {"kind": "grad", "name": rec.name, "missing": False, **rec.stats.as_dict()})
            for name in record.missing_grads:
                w.write(base | {"kind": "grad", "name": name, "missing": True})
            for rec in record.updates.values():
                w.write(base | {"kind": "update", "name": rec.name, "update_norm": rec.update_norm,
                                "weight_norm": rec.weight_norm, "ratio": rec.ratio})
        if record.grads:  # a scalar row: kept past the storage cap too
            w.write(base | {"kind": "scalar", "name": "grad_norm", "value": record.grad_norm})
        w.flush()

    def _check_anomalies(self, record: StepRecord) -> None:
        anomaly = False
        loss = record.scalars.get("loss")
        if loss is not None and self._loss_spikes.check(loss):
            anomaly = True
        if record.grads:
            gn = record.grad_norm
            if self._grad_spikes.check(gn):
                anomaly = True
        if anomaly:
            self._anomaly_left = max(self._anomaly_left, self.config.sampling.after_anomaly)

    def _on_finding_open(self, event: dict) -> None:
        if event["severity"] == "critical" and self.config.stop_on == "critical" and self._stop_error is None:
            self._stop_error = CriticalFindingError(event)

    # ------------------------------------------------------------------ console
    def _print_line(self, record: StepRecord) -> None:
        new = self.findings.take_recent()
        every = self.config.console.every
        if "loss" in record.scalars or record.sampled:
            self._logged_lines += 1
        show = record.sampled if every == 0 else (self._logged_lines % every == 0)
        if self._quiet or not (show or new):
            return
        parts = [f"[bold]step {record.step}[/]"]
        if "loss" in record.scalars:
            parts.append(f"loss {record.scalars['loss']:.4g}")
        if record.grads:
            parts.append(f"grad-norm {record.grad_norm:.3g}")
        for event in new[:3]:
            style = SEVERITY_STYLE.get(event["severity"], "")
            parts.append(f"[{style}]{event['severity']} {event['code']}[/] {event['target']}")
        if len(new) > 3:
            parts.append(f"+{len(new) - 3} more")
        self._console.print("stethoscope · " + " · ".join(parts), soft_wrap=True)  # one line in a log file

    # ------------------------------------------------------------------ state, meta, close
    def state_dict(self) -> dict:
        """Everything needed to continue this monitor in a new process (``resume=True`` loads it)."""
        if self.disabled:
            return {}
        return {
            "schema_version": rd.SCHEMA_VERSION,
            "last_step": self._last_step,
            "anomaly_left": self._anomaly_left,
            "epoch": self._epoch,
            "loss_spikes": self._loss_spikes.state_dict(),
            "grad_spikes": self._grad_spikes.state_dict(),
            "findings": self.findings.state_dict(),
            "rules": {getattr(r, "name", type(r).__name__): r.state_dict() for r in self._rules},
            "extensions": {e.name: e.state_dict() for e in self._extensions},
        }

    def load_state_dict(self, state: dict) -> None:
        if self.disabled:
            return
        self._last_step = state.get("last_step")
        self._anomaly_left = int(state.get("anomaly_left", 0))
        self._epoch = state.get("epoch")
        self._loss_spikes.load_state_dict(state.get("loss_spikes", {}))
        self._grad_spikes.load_state_dict(state.get("grad_spikes", {}))
        self.findings.load_state_dict(state.get("findings", {}))
        self._rule_states = state.get("rules", {})
        for rule in self._rules:
            key = getattr(rule, "name", type(rule).__name__)
            if key in self._rule_states:
                rule.load_state_dict(self._rule_states[key])
        ext_states = state.get("extensions", {})
        for ext in self._extensions:
            if ext.name in ext_states:
                ext.load_state_dict(ext_states[ext.name])

    def _state_due(self) -> bool:
        """Whether this sampled step rewrites state.json: a finding changed, or ``storage.state_every_s`` passed.

        The state grows with the rules' windows (about 20 ms to write for a 6-layer GPT-2 with full windows),
        so it is not rewritten on every sampled step; a run killed in between resumes from the last copy.
        """
        return (self.findings.events != self._state_saved[0]
                or time.monotonic() - self._state_saved[1] >= self.config.storage.state_every_s)

    def _save_state(self) -> None:
        rd.write_json_atomic(self.run_dir / rd.STATE, self.state_dict(), indent=None)
        self._state_saved = (self.findings.events, time.monotonic())

    def _model_summary(self) -> dict:
        model = self._model_ref()
        if model is None:
            return {}
        params = list(model.parameters())
        return {
            "class": type(model).__name__,
            "parameters": int(sum(p.numel() for p in params)),
            "trainable_parameters": int(sum(p.numel() for p in params if p.requires_grad)),
            "modules": sum(1 for _ in model.modules()),
            "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
            "devices": sorted({str(p.device) for p in params}),
        }

    def _write_meta(self, status: str, error: str | None = None) -> None:
        old = rd.read_json(self.run_dir / rd.META) if self._resumed else None
        meta = {
            "schema_version": rd.SCHEMA_VERSION,
            "status": status,
            "started_at": (old or {}).get("started_at", self._started.isoformat()),
            "ended_at": _dt.datetime.now(_dt.UTC).isoformat() if status != "running" else None,
            "last_step": self._last_step,
            "rank": self.rank,
            "world_size": self.world_size,
            "versions": _versions(),
            "model": self._model_summary() or (old or {}).get("model", {}),
            "optimizer": _optimizer_summary(self._optimizer_ref() if self._optimizer_ref else None),
            "config": self.config.model_dump(mode="json"),
            "schedule": repr(self.schedule),
            "verdict": self.findings.verdict(),
        }
        if error is None and status == "crashed":  # close(status="crashed") keeps the step's error
            error = getattr(self, "_crash_error", None)
        if error is not None:
            meta["error"] = error
            self._crash_error = error
        if self._resumed and old:
            meta["resumed"] = int(old.get("resumed", 0)) + (1 if status == "running" else 0)
        rd.write_json_atomic(self.run_dir / rd.META, meta)

    @property
    def closed(self) -> bool:
        return self._closed

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
        for ext in getattr(self, "_extensions", []):
            if ext.name == name:
                return ext
        return None

    def close(self, status: str | None = None) -> None:
        """Flush, run the final checks, write meta/report, and remove every hook. Safe to call twice.

        ``status`` defaults to "crashed" when the last step raised (e.g. ``close()`` in a ``finally``),
        else "finished".
        """
        if self.disabled or self._closed:
            self._closed = True
            return
        if status is None:
            status = "crashed" if getattr(self, "_crash_error", None) else "finished"
        self._closed = True
        stop_error = None
        if self._watchdog is not None:  # before the findings file closes; a resolved stall is closed
            self._guard("stopping the watchdog", self._watchdog.stop, status != "crashed")
        if self._profile is not None and self._profile.steps:
            self._guard("writing profile.json", self._profile.write, self.run_dir)
        try:
            try:
                self._flush(final=True)
            except CriticalFindingError as err:
                stop_error = err
            for rule in self._rules:
                self._guard(f"rule {getattr(rule, 'name', type(rule).__name__)}", rule.finish,
                            self._last_step)
            for ext in self._extensions:
                self._guard(f"extension {ext.name}", ext.close, status)
            self._guard("saving monitor state", self._save_state)
            self._write_meta(status)
        finally:
            self._detach()
            self._metrics.close()
            self._findings_writer.close()
        try:
            if self.config.report.enabled:
                from stethoscope.report import write_report

                write_report(self.run_dir, plots=self.config.report.plots)
        except Exception as exc:  # the report must not turn a finished run into a crash
            self._console.print(f"[yellow]stethoscope: could not write the report: {exc}[/]")
        if not self._quiet:
            from stethoscope.report import print_summary

            print_summary(self.run_dir, console=self._console)
        if stop_error is not None:
            raise stop_error

    def _detach(self) -> None:
        watchdog, self._watchdog = getattr(self, "_watchdog", None), None
        if watchdog is not None:
            with contextlib.suppress(Exception):
                watchdog.stop(resolve=False)
        for handle in self._handles:
            with contextlib.suppress(Exception):
                handle.remove()
        self._handles.clear()
        opt = getattr(self, "_zero_grad_patched", None)
        if opt is not None:
            with contextlib.suppress(AttributeError):
                del opt.zero_grad  # the instance attribute; the class method shows through again
            self._zero_grad_patched = None
        self._grad_params = []
        self._update_params = []
        self._update_snapshot = []
        self._grad_marks = []
        self._scaler_states = None
        self._dedup = {}
        self._sums = {}
        self._input_flags = {}
        self._model_ref = lambda: None  # type: ignore[assignment]
        self._optimizer_ref = None
        self._scaler_ref = None
        self._collector = StepCollector(self.config.stats.eps)
        for rule in self._rules:
            with contextlib.suppress(Exception):
                rule.detach()
        for ext in getattr(self, "_extensions", []):
            with contextlib.suppress(Exception):
                ext.detach()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:  # including a CriticalFindingError from stop_on: the run ended there
            self._crash_error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(CriticalFindingError):
                self.close(status="crashed")
        else:
            self.close()

    def __del__(self) -> None:  # hooks must not outlive a forgotten monitor
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self._detach()


def _weak_method(method: Callable, *bound: Any) -> Callable:
    """``method`` (with leading ``bound`` arguments) called through a weak reference to its object: a no-op
    once the object is gone. For callbacks handed to threads and logs that may outlive a forgotten monitor."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> Any:
        fn = ref()
        return None if fn is None else fn(*bound, *args, **kwargs)

    return call


def _optimizer_summary(opt: torch.optim.Optimizer | None) -> dict | None:
    if opt is None:
        return None
    groups = []
    for g in opt.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params" and isinstance(v, int | float | bool | str)}
                      | {"params": len(g["params"])})
    return {"class": type(opt).__name__, "groups": groups}


def _versions() -> dict:
    out = {
        "stethoscope": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    tf = sys.modules.get("transformers")
    if tf is not None:
        out["transformers"] = getattr(tf, "__version__", None)
    return out

