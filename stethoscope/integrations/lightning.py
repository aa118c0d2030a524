"""stethoscope for Lightning's ``Trainer``: one callback, the same monitor as your own loop.

Example::

    import lightning.pytorch as pl
    from stethoscope.integrations.lightning import StethoscopeCallback

    trainer = pl.Trainer(max_steps=1000, callbacks=[StethoscopeCallback()])
    trainer.fit(module, datamodule=dm)      # run directory: <default_root_dir>/stethoscope/

How Lightning's hooks map onto the monitor (docs/integrations.md):

============================  ==================================================================
``on_fit_start``              build the :class:`~stethoscope.Monitor` on the ``LightningModule`` and
                              ``trainer.optimizers[0]`` (and the precision plugin's ``GradScaler``)
``on_train_epoch_start``      ``mon.epoch(n)``
``on_train_batch_start``      ``mon.begin_step(trainer.global_step)`` unless a step is open: with
                              ``accumulate_grad_batches=k`` the k micro-batches are one step
``on_before_optimizer_step``  ``mon.after_backward()``: gradients read after AMP unscaling, before
                              Lightning clips them (that is where Lightning calls this hook)
``on_train_batch_end``        ``mon.end_step()`` when the optimizer stepped in this batch; the
                              loss of the batch (``outputs``) goes to ``mon.log`` (no host sync)
``on_validation_start/end``   ``mon.pause()`` around validation (sanity check included)
``on_fit_end``                ``mon.close()``
``on_exception``              the open step ends as failed, the run closes as crashed
============================  ==================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            f"stethoscope.integrations.lightning needs Lightning ({exc}); pip install 'stethoscope[lightning]'"
        ) from exc

import torch

from stethoscope.integrations._driver import Driver

DEFAULT_SUBDIR = "stethoscope"


def _scaler_of(trainer: Any) -> Any:
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and hasattr(scaler, "_per_optimizer_states") else None


def _loss_of(outputs: Any) -> Any:
    """The loss a ``training_step`` returned (a tensor, or a dict with ``loss``), else None."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs.detach()
    return None


class StethoscopeCallback(Callback):
    """A Lightning ``Callback`` that runs a :class:`~stethoscope.Monitor` during ``fit``.

    Args:
        run_dir: the run directory; default ``<trainer.default_root_dir>/stethoscope`` (``stethoscope-2``, ...
            when that one already holds a run). Under DDP each rank writes ``rank{N}/`` inside it.
        config: the monitor's configuration (path, dict or :class:`~stethoscope.Config`), validated now.
        log_loss: send the loss ``training_step`` returns to ``mon.log`` each optimizer step.
        **monitor_kwargs: passed to :class:`~stethoscope.Monitor` (``schedule=``, ``resume=``, ``scaler=``).

    Only the first optimizer is watched (automatic optimization has one). With manual optimization, Lightning
    calls ``on_before_optimizer_step`` from ``optimizer.step()`` too, so it works the same way.
    """

    def __init__(self, run_dir: str | Path | None = None, config: Any = None, log_loss: bool = True,
                 **monitor_kwargs: Any):
        super().__init__()
        self._driver = Driver(run_dir, config, monitor_kwargs)
        self.log_loss = log_loss
        self._stepped = False  # the optimizer stepped during the open monitored step
        self._losses: list[torch.Tensor] = []

    @property
    def monitor(self) -> Any:
        return self._driver.monitor

    @property
    def run_dir(self) -> Path | None:
        mon = self._driver.monitor
        return getattr(mon, "run_dir", None) if mon is not None else self._driver.run_dir

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        base = Path(getattr(trainer, "default_root_dir", None) or ".") / DEFAULT_SUBDIR
        mon = self._driver.start(pl_module, optimizers[0] if optimizers else None, base,
                                 scaler=_scaler_of(trainer))
        if not mon.disabled:
            # Lightning runs the forward and backward *inside* optimizer.step(closure) (fp32) and calls
            # on_before_optimizer_step after the closure: gradients are read there, not at the step pre-hook
            mon.read_grads_at_optimizer_step = False
        self._stepped = False
        self._losses = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        d = self._driver
        if d.active:
            d.guard("integration: marking the epoch", d.monitor.epoch, int(trainer.current_epoch))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        d = self._driver
        if not d.in_step:
            self._stepped = False
            self._losses = []
            d.begin(trainer.global_step)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._stepped = True
        self._driver.read_grads()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        d = self._driver
        if not d.active:
            return
        if self.log_loss:
            loss = _loss_of(outputs)
            if loss is not None:
                self._losses.append(loss)
        if not self._stepped:
            return  # accumulating: the monitored step goes on with the next micro-batch
        d.end()
        if self._losses:
            # automatic optimization hands back each micro-batch's loss divided by accumulate_grad_batches
            # (what was backpropagated): their sum is the step's loss. Manual: the mean. No host sync.
            losses = torch.stack([x.float().reshape(()) for x in self._losses])
            loss = losses.sum() if getattr(pl_module, "automatic_optimization", True) else losses.mean()
            d.guard("integration: logging the loss", d.monitor.log, loss=loss)
        self._losses = []
        self._stepped = False

    # ------------------------------------------------------------------ validation = pause
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._driver.pause()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._driver.resume()

    # ------------------------------------------------------------------ the end
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._driver.close("finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._driver.close("crashed", error=exception)

    def close(self, status: str | None = None, error: BaseException | None = None) -> None:
        """Close the monitor now (normally ``on_fit_end`` / ``on_exception`` do)."""
        self._driver.close(status, error)

    def state_dict(self) -> dict:
        return {}
