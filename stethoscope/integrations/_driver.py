"""What both framework callbacks share: one :class:`~stethoscope.Monitor` driven from callback events.

The callbacks are thin adapters: they translate a framework's events into ``begin`` / ``read_grads`` /
``end`` / ``pause`` / ``log`` / ``close`` here, and this class keeps the monitor's step protocol straight
(one monitored step per optimizer step, never nested, a pause exited exactly once) and contains failures:
anything our code raises is recorded as a ``monitor.error`` finding through the monitor's own guard and the
training goes on. Only :class:`~stethoscope.errors.CriticalFindingError` (``stop_on: critical``, asked for
by the user) and configuration mistakes at setup pass through.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
from pathlib import Path
from typing import Any

from stethoscope.config import Config, load_config
from stethoscope.errors import CriticalFindingError, MonitorUsageError
from stethoscope.rundir import META
from stethoscope.sinks.headline import PREFIX, Headline, attach

# Trainer log keys forwarded to ``mon.log`` (as the monitor's scalar names).
FORWARDED_LOGS = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "lr"}


def pick_run_dir(base: str | Path, rank: int | None) -> Path:
    """``base`` if it holds no run yet, else ``base-2``, ``base-3``, ... (the first free one).

    "Free" is judged on this rank's own folder (``rank{N}/`` when distributed) and on the absence of a
    merged ``meta.json`` at the top, so every rank of one launch picks the same folder without talking.
    """
    base = Path(base)
    for n in itertools.count(1):
        cand = base if n == 1 else base.with_name(f"{base.name}-{n}")
        target = cand / f"rank{rank}" if rank is not None else cand
        if rank is not None and (cand / META).is_file():
            continue  # an earlier run (merged, or not distributed) lives here
        if target.is_file() or (target.is_dir() and any(target.iterdir())):
            continue
        return cand
    raise AssertionError("unreachable")  # pragma: no cover


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): hooks must sit on the object whose ``step`` really runs."""
    import torch

    seen = 0
    while optimizer is not None and seen < 4:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            inner = getattr(optimizer, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
            seen += 1
            continue
        break
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


class Driver:
    """Holds one monitor for a framework callback. See the module docstring.

    Args:
        run_dir: the run directory; None = the framework's default (chosen in :meth:`start`).
        config: as for :class:`~stethoscope.Monitor` (validated here, so a mistake fails at construction).
        monitor_kwargs: passed on to :class:`~stethoscope.Monitor` (``schedule=``, ``resume=``, ...).
    """

    def __init__(self, run_dir: str | Path | None, config: Any, monitor_kwargs: dict):
        bad = {"model", "optimizer", "run_dir", "config"} & set(monitor_kwargs)
        if bad:
            raise MonitorUsageError(
                f"StethoscopeCallback(...) takes run_dir and config itself and finds model and optimizer in the "
                f"trainer; do not pass {sorted(bad)} as extra keyword arguments"
            )
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config: Config = load_config(config)
        self.monitor_kwargs = dict(monitor_kwargs)
        self.monitor: Any = None
        self.headline: Headline | None = None
        self._pause: contextlib.ExitStack | None = None
        self._atexit = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        mon = self.monitor
        return mon is not None and not mon.disabled and not mon.closed

    def start(self, model: Any, optimizer: Any, default_base: str | Path, scaler: Any = None) -> Any:
        """Create the monitor (closing one left from an earlier ``fit``/``train`` call first)."""
        from stethoscope.monitor import Monitor
        from stethoscope.monitor.meta import dist_rank

        if self.active:
            self.close(None)
        run_dir = self.run_dir
        if run_dir is None:
            run_dir = pick_run_dir(default_base, dist_rank()[0])
        kwargs = dict(self.monitor_kwargs)
        if scaler is not None and "scaler" not in kwargs:
            kwargs["scaler"] = scaler
        self.monitor = Monitor(model, optimizer=unwrap_optimizer(optimizer), run_dir=run_dir,
                               config=self.config, **kwargs)
        self.headline = attach(self.monitor)
        if not self._atexit:  # a training that dies with an exception still leaves a closed, crashed run
            atexit.register(self._at_exit)
            self._atexit = True
        return self.monitor

    def guard(self, where: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn``; an exception becomes a ``monitor.error`` finding (``stop_on`` errors pass)."""
        try:
            return fn(*args, **kwargs)
        except CriticalFindingError:
            raise
        except Exception as exc:
            mon = self.monitor
            if mon is not None and not mon.disabled:
                with contextlib.suppress(Exception):
                    mon.record_error(where, exc)
            return None

    # ------------------------------------------------------------------ steps
    def begin(self, step: int) -> None:
        if not self.active:
            return
        self.resume()
        mon = self.monitor
        if mon.in_step:  # the framework skipped our end event (e.g. a step cut short): close it first
            self.guard("integration: ending an unfinished step", mon.end_step)
        self.guard("integration: beginning a step", mon.begin_step, int(step))

    def read_grads(self) -> None:
        if self.active and self.monitor.in_step:
            self.guard("integration: reading gradients", self.monitor.after_backward)

    def end(self, failed: BaseException | None = None) -> None:
        if self.active and self.monitor.in_step:
            self.guard("integration: ending a step", self.monitor.end_step, failed)

    @property
    def in_step(self) -> bool:
        return self.active and self.monitor.in_step

    # ------------------------------------------------------------------ pause, logs
    def pause(self) -> None:
        """Enter ``mon.pause()`` (evaluation, checkpointing) until :meth:`resume`; idempotent."""
        if not self.active or self._pause is not None:
            return
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self.monitor.pause())
        except Exception as exc:
            self.guard("integration: pausing", _raise, exc)
            return
        self._pause = stack

    def resume(self) -> None:
        stack, self._pause = self._pause, None
        if stack is not None:
            self.guard("integration: resuming after a pause", stack.close)

    def log(self, values: dict) -> None:
        """Forward the known numeric trainer log keys to ``mon.log`` and flush the finished step."""
        if not self.active:
            return
        scalars = {}
        for key, name in FORWARDED_LOGS.items():
            value = values.get(key)
            if isinstance(value, bool) or value is None:
                continue
            try:
                scalars[name] = float(value)
            except (TypeError, ValueError):
                continue
        if scalars:
            self.guard("integration: logging", self.monitor.log, **scalars)
        if not self.monitor.in_step:
            # write the finished step now, so the headline numbers below include it
            self.guard("integration: flushing", self.monitor.flush)

    def headline_values(self) -> dict[str, float]:
        """The headline numbers as plain floats, keys prefixed ``stethoscope/``."""
        if self.monitor is None or self.monitor.disabled:
            return {}
        from stethoscope.sinks.headline import headline_values

        values = self.guard("integration: headline numbers", headline_values, self.monitor, self.headline)
        return {PREFIX + k: float(v) for k, v in (values or {}).items()}

    # ------------------------------------------------------------------ close
    def close(self, status: str | None, error: BaseException | None = None, reason: str | None = None) -> None:
        """End an open step (as failed when ``error``), leave a pause, and close the monitor.

        ``reason`` is written as ``meta.json``'s ``error`` of a crashed run when there is no exception.
        """
        mon = self.monitor
        if self._atexit:
            atexit.unregister(self._at_exit)
            self._atexit = False
        if mon is None or mon.disabled or mon.closed:
            return
        self.resume()
        if mon.in_step:
            self.guard("integration: ending the last step", mon.end_step, error)
        crash = None
        if error is not None:
            crash = f"{type(error).__name__}: {error}"
        elif status == "crashed" and reason and not mon.crash_error:
            crash = reason
        try:
            mon.close(status=status, error=crash)
        except CriticalFindingError:
            if error is None:
                raise
        except Exception as exc:  # closing must not turn a finished training into a crash
            with contextlib.suppress(Exception):
                mon.record_error("integration: closing", exc)

    def _at_exit(self) -> None:
        """At interpreter exit, a monitor still open means the trainer never sent its end event."""
        if not self.active:
            return
        with contextlib.suppress(BaseException):
            self.close("crashed", reason="the training ended without the trainer's end event "
                                         "(an exception or an interrupt)")


def _raise(exc: BaseException) -> None:
    raise exc
