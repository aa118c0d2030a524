"""Incident capture: when a loss or gradient goes non-finite or spikes, save what is needed to replay it.

Built by every :class:`~stethoscope.monitor.Monitor` (``incidents.enabled``). During each step it only keeps
references (see :mod:`stethoscope.incidents.capture`):

* a forward pre-hook on the root model keeps each call's ``args`` / ``kwargs`` and the RNG states just before
  it (a few KiB copied on the host; no device work, no copy of the batch);
* with ``incidents.weights: before_step`` (and ``auto`` where the gradients live in host memory), a step
  pre-hook on the optimizer reads the total gradient norm (on an accelerator, one device-to-host read per
  optimizer step: ``auto`` skips it there) and, when it is non-finite or spikes, copies the weights to the
  CPU *before* the optimizer changes them — the weights the failing forward used; the same hook notes that
  the optimizer stepped, so a step whose update the loop skipped saves its weights as the forward's;
* with a watched loader (:meth:`IncidentExtension.watch_loader`; the Hugging Face callback watches the
  Trainer's), the dataset indices of each batch.

These references are dropped when the step after next begins (the step's record can be processed one step
late). When the step's record is flushed, a trigger — a non-finite or spiking loss or gradient norm, or a
``numerics.nonfinite`` / ``grad.nonfinite`` / ``grad.norm_spike`` finding opening as an incident's root —
writes ``RUN_DIR/incidents/step-<N>/`` and appends the batch's indices to ``incidents/skip_batches.json``.
Triggers within ``sampling.after_anomaly`` steps of the last one are the same episode: their findings are
added to its manifest instead of a new folder.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stethoscope import rundir as rd
from stethoscope import stats
from stethoscope.extensions import Extension
from stethoscope.hooks import is_compiling
from stethoscope.incidents import capture as cap
from stethoscope.incidents.indices import LoaderWatch, watch_loader
from stethoscope.record import StepRecord
from stethoscope.sampling import SpikeDetector

INCIDENTS = "incidents"
# findings whose opening (as an incident's root) triggers a capture
TRIGGER_CODES = ("numerics.nonfinite", "grad.nonfinite", "grad.norm_spike")
_KEEP_STEPS = 3  # steps whose references are held: the open one and two waiting for their record
_MB = 1 << 20


def extension(run: Any) -> IncidentExtension | None:
    cfg = run.config.incidents
    model = run.model
    if not cfg.enabled or model is None:
        return None
    return IncidentExtension(run, model)


class IncidentExtension(Extension):
    """Incident capture for one monitor (see the module docstring).

    Attributes:
        captured: the manifests written so far (newest last).
        loaders: the loaders whose indices are recorded.
    """

    name = "incidents"

    def __init__(self, run: Any, model: nn.Module):
        self._run = run
        self.cfg = run.config.incidents
        self.captured: list[dict] = []
        self.loaders: list[LoaderWatch] = []
        self._hooks = run.hooks("incidents")
        self._steps: dict[int, cap.StepInputs] = {}
        self._between: list = []  # index lists yielded while no step was open: the next step's
        stats = run.config.stats
        self._grad_spikes = SpikeDetector(stats.grad_norm_spike)
        self._seen: set[str] = set()  # trigger findings already handled
        self._last_trouble: int | None = None
        self._current: dict | None = None  # the manifest of the episode now open
        self._hooks.forward_pre(model, self._on_forward, with_kwargs=True)
        self._steps_inside = False  # an optimizer step was seen inside a monitored step: a missing one means skipped
        optimizer = run.optimizer
        if optimizer is not None and self.cfg.weights != "off":
            self._hooks.step_pre(optimizer, self._before_update)

    # ------------------------------------------------------------------ public
    def watch_loader(self, loader: Any) -> bool:
        """Record the dataset indices of every batch ``loader`` yields (kept with an incident's batch and
        appended to ``skip_batches.json``). False when the loader exposes no indices."""
        watch = watch_loader(loader, self._hooks, self._on_batch)
        if watch is not None:
            self.loaders.append(watch)
        return watch is not None

    @property
    def folder(self) -> Path:
        return Path(self._run.run_dir) / INCIDENTS

    # ------------------------------------------------------------------ during a step
    def begin_step(self, step: int, sampled: bool) -> None:
        cur = cap.StepInputs(step)
        cur.indices, self._between = self._between, []
        self._steps[step] = cur
        while len(self._steps) > _KEEP_STEPS:
            del self._steps[next(iter(self._steps))]

    def _on_batch(self, indices: Any) -> None:
        run = self._run
        cur = self._steps.get(run.step) if run.step is not None else None
        (cur.indices if cur is not None else self._between).append(indices)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        run = self._run
        step = run.step
        if step is None or run.heartbeat.paused or is_compiling():
            return
        cur = self._steps.get(step)
        if cur is None:
            return
        if len(cur.calls) >= self.cfg.max_calls:
            cur.dropped_calls += 1
            return
        cur.calls.append(cap.ForwardCall(args, dict(kwargs), cap.rng_state(), module.training))

    def _before_update(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._run.guard("incident weight snapshot", self._check_update, optimizer)

    def _check_update(self, optimizer: torch.optim.Optimizer) -> None:
        """One total-norm read of the gradients the optimizer is about to apply; a copy of the weights
        when it is non-finite or spikes."""
        run = self._run
        cur = self._steps.get(run.step) if run.step is not None else None
        if cur is None or is_compiling():
            return
        cur.stepped = self._steps_inside = True
        if self.cfg.weights == "after_step":
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if self.cfg.weights == "auto" and not stats.reads_host(grads[0].device):
            return  # on an accelerator the read would wait for the device every step: after_step instead
        norm = run.gradient_norm(params)  # a sampled step on CPU: from the monitor's own gradient rows
        if norm is None:
            norm = float(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))  # the one host read
        cur.grad_norm = norm
        cur.grad_spike = self._grad_spikes.check(norm)  # non-finite counts too
        bad = cur.grad_spike and (self.cfg.spikes or not math.isfinite(norm))
        model = run.model
        if bad and cur.weights is None and model is not None and self._would_open(cur.step) and \
                cap.state_bytes(model) <= self.cfg.max_weights_mb * _MB:
            cur.weights = cap.cpu_state_dict(model)

    def _in_episode(self, step: int) -> bool:
        """Trouble at ``step`` belongs to the incident already open (within ``sampling.after_anomaly`` steps)."""
        return (self._current is not None and self._last_trouble is not None
                and step - self._last_trouble <= self._run.config.sampling.after_anomaly)

    def _would_open(self, step: int) -> bool:
        """Whether trouble at ``step`` would write a new folder: not inside the open episode (a diverging run
        spikes every step, and a weight copy per step would slow it to a crawl), and under the cap."""
        return len(self.captured) < self.cfg.max_incidents and not self._in_episode(step)

    # ------------------------------------------------------------------ at the step's record
    def observe(self, record: StepRecord) -> None:
        step = record.step
        cur = self._steps.get(step) if step is not None else None
        triggers = self._triggers(record, cur)
        findings = []
        for f in list(self._run.findings.open.values()):
            if f.code in TRIGGER_CODES and f.id not in self._seen and not f.data.get("caused_by"):
                self._seen.add(f.id)
                findings.append({"id": f.id, "code": f.code, "target": f.target, "severity": f.severity,
                                 "step": f.first_step})
        if not triggers and not findings:
            return
        if step is None:
            return
        episode = self._in_episode(step)
        self._last_trouble = step
        if episode:
            self._add_to_episode(step, triggers, findings)
        elif len(self.captured) < self.cfg.max_incidents:
            self._capture(step, cur, record, triggers, findings)
        else:
            self._current = None

    def _triggers(self, record: StepRecord, cur: cap.StepInputs | None) -> list[dict]:
        out = []
        loss = record.scalars.get("loss")
        if loss is not None:
            if not math.isfinite(loss):
                out.append({"kind": "loss.nonfinite", "value": loss})
            elif record.loss_spike_median is not None and self.cfg.spikes:  # the monitor's own loss check
                out.append({"kind": "loss.spike", "value": loss, "median": record.loss_spike_median})
        norm = cur.grad_norm if cur is not None else None
        spike = bool(cur.grad_spike) if cur is not None else False
        if norm is None and record.grads and not record.scaler_skipped:  # no optimizer: the monitor's read
            norm = record.grad_norm
            spike = self._grad_spikes.check(norm)
        if norm is not None and math.isfinite(norm) and spike and self.cfg.spikes:
            out.append({"kind": "grad.norm_spike", "value": norm, "median": self._grad_spikes.median()})
        if norm is not None and not math.isfinite(norm):
            out.append({"kind": "grad.nonfinite", "value": norm})
        return out

    def _add_to_episode(self, step: int, triggers: list[dict], findings: list[dict]) -> None:
        manifest = self._current
        assert manifest is not None
        manifest["later"].extend({"step": step, **t} for t in triggers)
        manifest["findings"].extend(findings)
        if findings:
            rd.write_json_atomic(Path(manifest["path"]) / cap.MANIFEST, manifest)

    def _capture(self, step: int, cur: cap.StepInputs | None, record: StepRecord, triggers: list[dict],
                 findings: list[dict]) -> None:
        run = self._run
        t0 = time.perf_counter()
        folder = self._new_folder(step)
        model, optimizer = run.model, run.optimizer
        manifest: dict[str, Any] = {
            "schema_version": rd.SCHEMA_VERSION,
            "id": folder.name,
            "path": str(folder),
            "step": step,
            "epoch": run.epoch,
            "time": time.time(),
            "triggers": triggers,
            "findings": findings,
            "later": [],
            "loss": record.scalars.get("loss"),
            "grad_norm": cur.grad_norm if cur is not None else None,
            "model": type(model).__name__ if model is not None else None,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "learning_rates": _learning_rates(optimizer),
            "factory": {"spec": self.cfg.factory, "kwargs": self.cfg.factory_kwargs} if self.cfg.factory else None,
        }
        if cur is not None and cur.calls:
            manifest["batch"] = cap.save_batch(cur.calls, folder, int(self.cfg.max_batch_mb * _MB))
            manifest["batch"]["dropped_calls"] = cur.dropped_calls
            manifest["training"] = cur.calls[0].training
            manifest["rng"] = {"file": cap.RNG, "generators": sorted(cur.calls[0].rng)}
        else:
            why = ("no call of the model's forward was seen in this step" if cur is not None else
                   "the step's inputs were no longer held when its record arrived")
            manifest["batch"] = {"file": None, "note": f"not saved: {why}"}
            manifest["rng"] = {"file": None, "note": "not saved (no forward call held)"}
        manifest["weights"] = self._save_weights(folder, cur, record)
        manifest["indices"] = self._save_indices(folder, cur, manifest)
        manifest["capture_seconds"] = round(time.perf_counter() - t0, 4)
        rd.write_json_atomic(folder / cap.MANIFEST, manifest)
        self.captured.append(manifest)
        self._current = manifest
        if not run.config.console.quiet:
            from rich.markup import escape

            from stethoscope.console import get_console

            what = ", ".join(t["kind"] for t in triggers) or ", ".join(f["code"] for f in findings)
            get_console().print(f"[bold]incident[/] at step {step} ({what}): saved {escape(str(folder))} — "
                                f"replay it with: stethoscope replay {escape(str(folder))} --factory pkg.mod:fn",
                                soft_wrap=True)

    def _new_folder(self, step: int) -> Path:
        base = self.folder / f"step-{step}"
        folder, n = base, 1
        while folder.exists():  # a resumed run passing the same step again
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        folder.mkdir(parents=True)
        return folder

    def _save_weights(self, folder: Path, cur: cap.StepInputs | None, record: StepRecord) -> dict:
        mode = self.cfg.weights
        if mode == "off":
            return {"file": None, "when": None, "note": "not saved (incidents.weights: off)"}
        if cur is not None and cur.weights is not None:
            torch.save(cur.weights, folder / cap.WEIGHTS)
            return {"file": cap.WEIGHTS, "when": "before_optimizer_step", "bytes": _bytes(cur.weights),
                    "note": "copied at the optimizer's step pre-hook, before the update: the weights the "
                            "failing forward used"}
        model = self._run.model
        if model is None:
            return {"file": None, "when": None, "note": "not saved: the model is gone"}
        size = cap.state_bytes(model)
        if size > self.cfg.max_weights_mb * _MB:
            return {"file": None, "when": None, "bytes_full": size,
                    "note": f"not saved: {size / _MB:.1f} MiB is over incidents.max_weights_mb "
                            f"({self.cfg.max_weights_mb:g})"}
        weights = cap.cpu_state_dict(model)
        torch.save(weights, folder / cap.WEIGHTS)
        if record.scaler_skipped:
            when, note = "unchanged_by_step", ("the GradScaler skipped this step's optimizer step, so these are "
                                               "the weights the failing forward used")
        elif self._steps_inside and cur is not None and not cur.stepped:
            when, note = "unchanged_by_step", ("the optimizer did not step in this step (the loop skipped the "
                                               "update), so these are the weights the failing forward used")
        elif self._run.optimizer is None:
            when, note = "after_step", "no optimizer was given to the monitor: the weights as they were at the " \
                                       "step's end (your loop may have updated them after the forward)"
        else:
            reason = ("incidents.weights is after_step" if mode == "after_step" else
                      "incidents.weights is auto and the gradients live on an accelerator, where reading their "
                      "norm before every update would wait for the device" if mode == "auto" and cur is not None
                      and cur.grad_norm is None else
                      "the gradients the optimizer applied looked healthy (finite, no spike), so no copy was "
                      "taken before the update")
            when, note = "after_optimizer_step", (
                f"after the optimizer's step ({reason}): one update past the weights the failing forward used")
        return {"file": cap.WEIGHTS, "when": when, "bytes": _bytes(weights), "note": note}

    def _save_indices(self, folder: Path, cur: cap.StepInputs | None, manifest: dict) -> dict:
        if not self.loaders:
            return {"available": False, "note": "no loader watched: pass yours to "
                    "mon.extension('incidents').watch_loader(loader) (the Hugging Face callback does it)"}
        batches = list(cur.indices) if cur is not None else []
        if not batches:
            return {"available": False, "note": "the watched loader yielded no batch for this step"}
        entry = {"incident": manifest["id"], "step": manifest["step"], "epoch": manifest["epoch"],
                 "indices": batches}
        path = self.folder / cap.SKIP_BATCHES
        doc = rd.read_json(path) or {"schema_version": rd.SCHEMA_VERSION, "batches": []}
        doc["batches"].append(entry)
        rd.write_json_atomic(path, doc)
        (folder / "indices.json").write_text(json.dumps(entry) + "\n", encoding="utf-8")
        return {"available": True, "file": "indices.json", "batches": batches,
                "skip_file": str(path)}

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> None:
        self._hooks.remove()
        self._steps.clear()
        self._between = []
        self.loaders = []

    def state_dict(self) -> dict:
        return {"captured": len(self.captured), "last_trouble": self._last_trouble,
                "grad_spikes": self._grad_spikes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.captured = [{} for _ in range(int(state.get("captured", 0)))]  # counts toward max_incidents
        self._last_trouble = state.get("last_trouble")
        self._grad_spikes.load_state_dict(state.get("grad_spikes", {}))


def _learning_rates(optimizer: Any) -> list[dict]:
    """Each parameter group's hyperparameters (plain values only: lr, betas, weight decay, ...)."""
    if optimizer is None:
        return []
    out = []
    for group in optimizer.param_groups:
        row = {k: (float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in group.items()
               if k != "params"}
        out.append({k: v for k, v in row.items() if isinstance(v, int | float | str | bool | tuple | list)
                    or v is None} | {"params": len(group["params"])})
    return out


def _bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())
