"""The TensorBoard sink: the run's headline numbers as scalars, and its spread as histograms.

Off by default; ``tensorboard: {enabled: true}`` turns it on. It writes with torch's own
``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package, ``pip install stethoscope[tensorboard]``),
imported only when enabled, so the optional extra costs nothing when it is off. What it writes (tags):

every flushed step (``record.step`` known):
    ``stethoscope/<name>`` for every scalar logged with ``mon.log`` (``loss``, ...), and
    ``stethoscope/findings_critical`` / ``_warning`` / ``_info`` / ``_open``;
sampled steps, in addition:
    ``stethoscope/grad_norm`` (global), ``stethoscope/zero_grad_fraction_max`` (beyond what is normal);
sampled steps, histograms (``tensorboard.histograms``), one value per parameter or module:
    ``grads/norm_log10`` (log10 of each parameter's gradient norm), ``grads/zero_fraction``,
    ``updates/ratio_log10`` (log10 of each parameter's ‖Δw‖/‖w‖), ``acts/std_log10`` (log10 of each
    module output's standard deviation), ``acts/saturation_fraction``.

The histograms are *across parameters/modules*, from statistics the monitor already has on the host: no
tensor is copied for them, and one glance shows whether a whole population drifts (every update ratio sliding
towards 1e-6) or a few members stray. Each rank writes its own event files (``rank{N}`` under ``log_dir``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from stethoscope.errors import StethoscopeError
from stethoscope.extensions import Extension
from stethoscope.record import StepRecord
from stethoscope.sinks.headline import PREFIX, a_rule, headline_values, worst_zero_fraction

INSTALL_HINT = "pip install 'stethoscope[tensorboard]'  (or: pip install tensorboard)"


class TensorBoardUnavailableError(StethoscopeError, ImportError):
    """``tensorboard.enabled`` is set but the ``tensorboard`` package cannot be imported."""


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise TensorBoardUnavailableError(
            f"tensorboard.enabled is true but TensorBoard is not installed ({exc}); {INSTALL_HINT}"
        ) from exc
    return SummaryWriter


def log_dir_for(run: Any) -> Path:
    """Where the event files go: ``tensorboard.log_dir`` (``/rank{N}`` appended when distributed), else
    ``<run_dir>/tensorboard`` (the run directory is already per rank). ``run``: the run context (or the
    monitor: both carry ``config``, ``rank`` and ``run_dir``)."""
    cfg = run.config.tensorboard
    if cfg.log_dir:
        base = Path(cfg.log_dir)
        return base / f"rank{run.rank}" if run.rank is not None else base
    return Path(run.run_dir) / "tensorboard"


def _log10_finite(values: list[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return np.log10(arr)


def _finite(values: list[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    return arr[np.isfinite(arr)]


class TensorBoardSink(Extension):
    """Writes each flushed record to TensorBoard (see the module docstring for the tags)."""

    name = "tensorboard"

    def __init__(self, run: Any, writer: Any = None):
        self._run = run
        self.log_dir = log_dir_for(run)
        self.histograms = bool(run.config.tensorboard.histograms)
        if writer is None:
            writer = _summary_writer_class()(log_dir=str(self.log_dir))
        self.writer = writer
        self._rule = a_rule(run)

    def observe(self, record: StepRecord) -> None:
        step = record.step
        if step is None or self.writer is None:
            return
        w = self.writer
        for name, value in record.scalars.items():
            if isinstance(value, int | float) and math.isfinite(value):
                w.add_scalar(PREFIX + name, float(value), step)
        for name, value in headline_values(self._run).items():
            w.add_scalar(PREFIX + name, value, step)
        if not record.sampled:
            return
        if record.grads:
            gn = record.grad_norm
            if math.isfinite(gn):
                w.add_scalar(PREFIX + "grad_norm", gn, step)
            zf = worst_zero_fraction(record, self._rule)
            if zf is not None:
                w.add_scalar(PREFIX + "zero_grad_fraction_max", zf, step)
        if self.histograms:
            self._histograms(record, step)
        w.flush()

    def _histograms(self, record: StepRecord, step: int) -> None:
        series: list[tuple[str, np.ndarray]] = []
        if record.grads:
            stats = [r.stats for r in record.grads.values()]
            series.append(("grads/norm_log10", _log10_finite([s.norm for s in stats])))
            series.append(("grads/zero_fraction", _finite([s.zero_fraction for s in stats])))
        if record.updates:
            series.append(("updates/ratio_log10", _log10_finite([u.ratio for u in record.updates.values()])))
        if record.acts:
            stats = [r.stats for r in record.acts.values()]
            series.append(("acts/std_log10", _log10_finite([s.std for s in stats])))
            series.append(("acts/saturation_fraction", _finite([s.saturation_fraction for s in stats])))
        for tag, values in series:
            if values.size:
                self.writer.add_histogram(tag, values, step)

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def detach(self) -> None:
        if self.writer is not None:  # a forgotten monitor: do not leave the file handle open
            try:
                self.writer.close()
            finally:
                self.writer = None
        self._rule = None


def extension(run: Any) -> TensorBoardSink | None:
    """The sink when ``tensorboard.enabled`` is on; None otherwise (nothing is imported then)."""
    if not run.config.tensorboard.enabled:
        return None
    return TensorBoardSink(run)


__all__ = ["INSTALL_HINT", "TensorBoardSink", "TensorBoardUnavailableError", "extension", "log_dir_for"]
