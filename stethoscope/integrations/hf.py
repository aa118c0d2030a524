"""stethoscope for the Hugging Face ``Trainer``: one callback, the same monitor as your own loop.

Example::

    from transformers import Trainer
    from stethoscope.integrations.hf import StethoscopeCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[StethoscopeCallback(config={"sampling": {"every": 100}})])
    trainer.train()          # run directory: <args.output_dir>/stethoscope/

How the Trainer's events map onto the monitor (docs/integrations.md):

=========================  =====================================================================
``on_train_begin``         build the :class:`~stethoscope.Monitor` on ``model`` and the optimizer
                           (the torch optimizer inside accelerate's wrapper; its ``GradScaler``)
``on_epoch_begin``         ``mon.epoch(n)``
``on_step_begin``          ``mon.begin_step(state.global_step)`` — the first micro-batch of an
                           optimizer step, so gradient accumulation is one monitored step
``on_pre_optimizer_step``  ``mon.after_backward()``: gradients read after the Trainer unscaled and
                           clipped them, before the optimizer uses them
``on_step_end``            ``mon.end_step()``; when the Trainer is about to evaluate or save,
                           ``mon.pause()`` until the next step (no stall alarms during eval)
``on_log``                 ``loss`` / ``eval_loss`` / ``learning_rate`` to ``mon.log``; the headline
                           numbers back into the logs as plain floats (``stethoscope/...``)
``on_train_end``           ``mon.close()``; an exception that skips it closes the run as crashed
                           at interpreter exit (or call :meth:`StethoscopeCallback.close`)
=========================  =====================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from stethoscope.integrations._driver import Driver

DEFAULT_SUBDIR = "stethoscope"


def _scaler_of(optimizer: Any) -> Any:
    """The GradScaler accelerate attached to its ``AcceleratedOptimizer`` (None without mixed precision)."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and hasattr(scaler, "_per_optimizer_states") else None


class StethoscopeCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs a :class:`~stethoscope.Monitor` during ``train()``.

    Args:
        run_dir: the run directory; default ``<args.output_dir>/stethoscope`` (``stethoscope-2``, ... when
            that one already holds a run). Under DDP each rank writes ``rank{N}/`` inside it.
        config: the monitor's configuration (path, dict or :class:`~stethoscope.Config`), validated now.
        **monitor_kwargs: passed to :class:`~stethoscope.Monitor` (``schedule=``, ``resume=``, ``scaler=``).

    Attributes:
        monitor: the running monitor (None before ``on_train_begin``); after training it is closed and
            ``monitor.run_dir`` says where the run went.
    """

    def __init__(self, run_dir: str | Path | None = None, config: Any = None, **monitor_kwargs: Any):
        self._driver = Driver(run_dir, config, monitor_kwargs)

    @property
    def monitor(self) -> Any:
        return self._driver.monitor

    @property
    def run_dir(self) -> Path | None:
        mon = self._driver.monitor
        return getattr(mon, "run_dir", None) if mon is not None else self._driver.run_dir

    # ------------------------------------------------------------------ training
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        base = Path(args.output_dir or ".") / DEFAULT_SUBDIR
        self._driver.start(model, optimizer, base, scaler=_scaler_of(optimizer))
        incidents = self._driver.monitor.extension("incidents") if self._driver.active else None
        if incidents is not None and kwargs.get("train_dataloader") is not None:  # each batch's dataset indices
            self._driver.guard("integration: watching the train dataloader", incidents.watch_loader,
                               kwargs["train_dataloader"])

    def on_epoch_begin(self, args, state, control, **kwargs):
        d = self._driver
        if d.active and state.epoch is not None:
            d.guard("integration: marking the epoch", d.monitor.epoch, int(state.epoch))

    def on_step_begin(self, args, state, control, **kwargs):
        self._driver.begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._driver.read_grads()

    def on_step_end(self, args, state, control, **kwargs):
        d = self._driver
        d.end()
        if control.should_evaluate or control.should_save:  # set by DefaultFlowCallback just before us
            d.pause()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_evaluate or control.should_save:
            self._driver.pause()

    # ------------------------------------------------------------------ evaluation and logs
    def on_evaluate(self, args, state, control, **kwargs):
        pass  # the pause entered at on_step_end lasts until the next step begins

    def on_log(self, args, state, control, logs=None, **kwargs):
        d = self._driver
        if logs is None or not d.active:
            return
        d.log(logs)
        values = d.headline_values()
        if not values:
            return
        logs.update(values)  # callbacks after this one (progress bar, printer) see them
        # Trainer.log stored a copy before calling us: put the numbers into that history entry too
        history = getattr(state, "log_history", None)
        if (history and history[-1].get("step") == state.global_step
                and set(history[-1]) - {"step"} == set(logs) - set(values)):
            history[-1].update(values)

    # ------------------------------------------------------------------ the end
    def on_train_end(self, args, state, control, **kwargs):
        self._driver.close("finished")

    def close(self, status: str | None = None, error: BaseException | None = None) -> None:
        """Close the monitor now (e.g. in your ``except`` around ``trainer.train()``: ``close(error=exc)``)."""
        self._driver.close(status, error)
