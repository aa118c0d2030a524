"""Lightning's Trainer with StethoscopeCallback: a tiny GPT-2, CPU, accumulate_grad_batches=2."""

from __future__ import annotations

import json

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import stethoscope as st  # noqa: E402
from stethoscope.integrations.lightning import StethoscopeCallback  # noqa: E402
from tests.integrations.conftest import FAST, grad_norm, tiny_gpt2_lm, token_rows  # noqa: E402


class LM(pl.LightningModule):
    def __init__(self, fail_at_batch: int | None = None):
        super().__init__()
        self.model = tiny_gpt2_lm()
        self.fail_at_batch = fail_at_batch

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("bad batch")
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Recorder(pl.Callback):
    """The true gradient norm where the monitor reads gradients; per-step losses; pause state in validation."""

    def __init__(self, cb: StethoscopeCallback):
        self.cb = cb
        self.norms: list[float] = []
        self.batch_losses: list[float] = []
        self.paused: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert self.cb.monitor.in_step
        self.norms.append(grad_norm(pl_module.parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_losses.append(float(outputs["loss"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.paused.append(self.cb.monitor.heartbeat.paused)


def _trainer(tmp_path, callbacks, **kw):
    base = dict(
        max_steps=4, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), limit_val_batches=1, val_check_interval=4, num_sanity_val_steps=1,
        callbacks=callbacks,
    )
    base.update(kw)
    return pl.Trainer(**base)


def _loader(n: int = 16, seed: int = 0):
    return torch.utils.data.DataLoader(token_rows(n, seed), batch_size=2)


def test_fit_one_monitored_step_per_optimizer_step(tmp_path):
    cb = StethoscopeCallback(config=FAST)
    rec = Recorder(cb)
    trainer = _trainer(tmp_path, [cb, rec])
    trainer.fit(LM(), _loader(), _loader(4, seed=1))

    assert cb.run_dir == tmp_path / "stethoscope"
    meta = json.loads((cb.run_dir / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["last_step"] == 3
    assert trainer.global_step == 4

    run = st.load_run(cb.run_dir)
    # 8 micro-batches, 4 optimizer steps, 4 monitored steps with gradients read at on_before_optimizer_step
    assert len(rec.batch_losses) == 8 and len(rec.norms) == 4
    assert sorted(run.metrics_of("grad")["step"].unique()) == [0, 1, 2, 3]
    assert run.scalars()["grad_norm"].to_numpy() == pytest.approx(rec.norms, rel=1e-4)
    # the logged loss of a step is the sum of its micro-batches' (loss / 2) outputs: the loss backpropagated
    expected = [rec.batch_losses[i] + rec.batch_losses[i + 1] for i in range(0, 8, 2)]
    assert run.scalars()["loss"].to_numpy() == pytest.approx(expected, rel=1e-5)
    # update ratios were measured around the real optimizer's step (the closure ran inside it)
    assert sorted(run.metrics_of("update")["step"].unique()) == [0, 1, 2, 3]
    assert run.metrics_of("grad")["missing"].astype(bool).sum() == 0

    # sanity check and validation ran inside mon.pause()
    assert len(rec.paused) >= 2 and all(rec.paused)
    assert not cb.monitor.heartbeat.paused
    assert cb.monitor.hooks_attached == 0


def test_exception_closes_the_run_as_crashed(tmp_path):
    cb = StethoscopeCallback(config=FAST)
    trainer = _trainer(tmp_path, [cb], limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="bad batch"):
        trainer.fit(LM(fail_at_batch=3), _loader())
    assert cb.monitor.closed
    run = st.load_run(cb.run_dir)
    assert run.status == "crashed"
    assert "bad batch" in run.meta["error"]
    assert run.meta["last_step"] == 1  # the second optimizer step died in its second micro-batch
