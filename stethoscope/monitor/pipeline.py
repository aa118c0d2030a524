"""A finished step's way from the device to the findings, in one place.

At a step boundary (or ``flush()`` / ``close()``) the previous step's queued rows and logged scalars cross
to the host in one transfer per device; then, in this order: the record is built, written to
``metrics.jsonl``, checked for a loss or gradient-norm spike (which samples the next steps in full), shown
to every rule and then every extension, summarised in one console line, and ``state.json`` is rewritten
when a finding changed. A critical finding under ``stop_on: critical`` is raised here, after all of that.

An unsampled step whose only device data are logged CUDA scalars is not waited for: its values travel
through :class:`~stethoscope.collector.AsyncScalars` and are processed once they have arrived.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stethoscope import rundir as rd
from stethoscope.collector import AsyncScalars, Entry, StepCollector
from stethoscope.config import Config
from stethoscope.errors import CriticalFindingError
from stethoscope.findings import FindingLog
from stethoscope.monitor.guard import ErrorGuard
from stethoscope.monitor.records import MetricsWriter, build_record, console_line, due_line
from stethoscope.record import StepRecord
from stethoscope.sampling import SpikeDetector


class RecordPipeline:
    """Flushes finished steps (see the module docstring).

    ``rules`` and ``extensions`` are the monitor's lists (appended to after construction); ``epoch`` and
    ``state`` are read when a record is built and when ``state.json`` is written.
    """

    def __init__(self, config: Config, collector: StepCollector, metrics: MetricsWriter, findings: FindingLog,
                 guard: ErrorGuard, console: Any, run_dir: Path, epoch: Callable[[], int | None],
                 state: Callable[[], dict]):
        self.config = config
        self.collector = collector
        self.metrics = metrics
        self.findings = findings
        self.guard = guard
        self.console = console
        self.quiet = config.console.quiet
        self.run_dir = run_dir
        self.epoch = epoch
        self.state = state
        self.rules: list[Any] = []
        self.extensions: list[Any] = []
        self.pending: dict | None = None  # the last step's {"step", "sampled", "missing"}, waiting for its flush
        self.scalars: dict[str, Any] = {}  # logged since the last flush
        self.anomaly_left = 0  # steps still sampled in full after a spike
        self.loss_spikes = SpikeDetector(config.stats.loss_spike)
        self.grad_spikes = SpikeDetector(config.stats.grad_norm_spike)
        self.stop_error: CriticalFindingError | None = None
        self._async = AsyncScalars()  # logged CUDA scalars of unsampled steps, read without a stall
        self._logged_lines = 0
        self._state_saved = (-1, -math.inf)  # (finding events, monotonic time) at the last state.json write

    def take_anomaly(self) -> bool:
        """Whether the step about to begin is sampled because of a recent spike (counts it down)."""
        if self.anomaly_left > 0:
            self.anomaly_left -= 1
            return True
        return False

    def on_finding_open(self, event: dict) -> None:
        if event["severity"] == "critical" and self.config.stop_on == "critical" and self.stop_error is None:
            self.stop_error = CriticalFindingError(event)

    # ------------------------------------------------------------------ flushing
    def flush(self, last_step: int | None, final: bool = False) -> None:
        """Bring the pending step's rows and scalars to the host and process them (``final`` waits for
        queued CUDA scalars too)."""
        pending, self.pending = self.pending, None
        scalars, self.scalars = self.scalars, {}
        if pending is None and not scalars:
            self._process_async(block=final)
            return
        step = pending["step"] if pending is not None else last_step
        tensor_scalars = [(k, v) for k, v in scalars.items() if isinstance(v, torch.Tensor)]
        values = {k: float(v) for k, v in scalars.items() if not isinstance(v, torch.Tensor)}
        sampled = bool(pending and pending["sampled"])
        if (not sampled and not final and tensor_scalars and len(self.collector) == 0
                and all(v.device.type == "cuda" for _, v in tensor_scalars)):
            try:
                self._async.submit(step, pending, [k for k, _ in tensor_scalars],
                                   [v for _, v in tensor_scalars], values)
            except Exception as exc:
                self.guard.record("queueing logged scalars", exc)
            self._process_async(block=False)
            return
        self._process_async(block=True)  # earlier steps first, so records stay in step order
        for k, v in tensor_scalars:
            self.collector.add(Entry("scalar", k, "", 0, 1), v.to(torch.float32).reshape(1))
        try:
            entries, rows, dead = self.collector.fetch()
        except Exception as exc:
            self.guard.record("reading statistics back from the device", exc)
            entries, rows, dead = [], [], {}
        self._process(self._record(step, pending, entries, rows, dead, values))

    def _record(self, step, pending, entries, rows, dead, values) -> StepRecord:
        return build_record(step, pending, entries, rows, dead, values, self.epoch(), self.config.stats.per_call)

    def _process_async(self, block: bool) -> None:
        if len(self._async):
            for step, pending, values in self._async.ready(block):
                self._process(self._record(step, pending, [], [], {}, values))

    def _process(self, record: StepRecord) -> None:
        guard = self.guard
        guard("writing metrics", self.metrics.write_record, record)
        guard("checking anomalies", self._check_anomalies, record)
        for rule in self.rules:
            guard(f"rule {getattr(rule, 'name', type(rule).__name__)}", rule.observe, record)
        for ext in self.extensions:
            guard(f"extension {ext.name}", ext.observe, record)
        self._print_line(record)
        if record.sampled and self._state_due():
            guard("saving monitor state", self.save_state)
        if self.stop_error is not None:
            err, self.stop_error = self.stop_error, None
            raise err

    def _check_anomalies(self, record: StepRecord) -> None:
        """A loss or gradient-norm spike (or a non-finite one) samples the next ``sampling.after_anomaly``
        steps in full."""
        anomaly = False
        loss = record.scalars.get("loss")
        if loss is not None and self.loss_spikes.check(loss):
            anomaly = True
            if math.isfinite(loss):
                record.loss_spike_median = self.loss_spikes.median()
        # a step the GradScaler skipped has non-finite gradients by design: that is the scaler working, not an
        # anomaly to sample in full (amp.skips says when the skipping is not normal)
        if record.grads and not record.scaler_skipped and self.grad_spikes.check(record.grad_norm):
            anomaly = True
        if anomaly:
            self.anomaly_left = max(self.anomaly_left, self.config.sampling.after_anomaly)

    def _print_line(self, record: StepRecord) -> None:
        new = self.findings.take_recent()
        if "loss" in record.scalars or record.sampled:
            self._logged_lines += 1
        if self.quiet:
            return
        # what a reader must hear: problems that open on their own (a consequence folds under its root, and a
        # worsening open finding is in the summary); while one is open, a line only when that changes — a NaN
        # run must not print 50 "loss nan" lines, nor a spike 30 lines of its consequences
        new = [e for e in new if e["event"] == "open" and not (e.get("data") or {}).get("caused_by")]
        quiet_now = not new and any(f.severity != "info" for f in list(self.findings.open.values()))
        if quiet_now or not due_line(record, new, self.config.console.every, self._logged_lines):
            return
        self.console.print(console_line(record, new), soft_wrap=True)  # one line in a log file

    # ------------------------------------------------------------------ state.json
    def _state_due(self) -> bool:
        """Whether this sampled step rewrites state.json: a finding changed, or ``storage.state_every_s`` passed.

        The state grows with the rules' windows (about 20 ms to write for a 6-layer GPT-2 with full windows),
        so it is not rewritten on every sampled step; a run killed in between resumes from the last copy.
        """
        return (self.findings.events != self._state_saved[0]
                or time.monotonic() - self._state_saved[1] >= self.config.storage.state_every_s)

    def save_state(self) -> None:
        rd.write_json_atomic(self.run_dir / rd.STATE, self.state(), indent=None)
        self._state_saved = (self.findings.events, time.monotonic())

    def state_dict(self) -> dict:
        return {"anomaly_left": self.anomaly_left, "loss_spikes": self.loss_spikes.state_dict(),
                "grad_spikes": self.grad_spikes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.anomaly_left = int(state.get("anomaly_left", 0))
        self.loss_spikes.load_state_dict(state.get("loss_spikes", {}))
        self.grad_spikes.load_state_dict(state.get("grad_spikes", {}))
