"""fp16 mixed precision with a GradScaler in both framework callbacks, on a real GPU (issue 17, item 6).

The callback must find the framework's GradScaler (an ``amp`` row every sampled step: the scale and each
step's skip flag) and read gradients unscaled: the monitor's global gradient norm equals the one computed by
hand where the framework reads them, whatever the loss scale (2**16 at the start).
"""

from __future__ import annotations

import math

import pytest
import torch

import stethoscope as st
from tests.cuda.conftest import needs_cuda
from tests.integrations.conftest import FAST, TokenDataset, grad_norm, tiny_gpt2_lm, token_rows

pytestmark = [pytest.mark.cuda, needs_cuda]
EVERY = {**FAST, "sampling": {"warmup_steps": 100, "every": 1}}


def _same_norms(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        if math.isfinite(b):
            assert a == pytest.approx(b, rel=1e-3)
        else:  # a step the scaler skips: non-finite gradients, read as such
            assert not math.isfinite(a)


def _check_amp(run: st.Run, steps: int) -> None:
    scal = run.scalars()
    assert "amp_scale" in scal, list(scal)
    scales = scal["amp_scale"].dropna().to_numpy()
    assert len(scales) == steps and (scales > 0).all() and (scales <= 2.0**16).all()
    assert not [f for f in run.findings if f.code == "monitor.error"], [f.message for f in run.findings]
    assert sorted(run.metrics_of("grad")["step"].unique()) == list(range(steps))


def test_hf_trainer_fp16_gradscaler(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from stethoscope.integrations.hf import StethoscopeCallback

    class Norms(TrainerCallback):
        def __init__(self):
            self.norms: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.norms.append(grad_norm(model.parameters()))

    cb = StethoscopeCallback(config=EVERY)
    rec = Norms()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=6, logging_steps=1, learning_rate=1e-3, report_to="none", save_strategy="no", fp16=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=tiny_gpt2_lm(), args=args, train_dataset=TokenDataset(48), callbacks=[cb, rec])
    trainer.train()
    run = st.load_run(cb.run_dir)
    assert run.status == "finished"
    _check_amp(run, 6)
    _same_norms(list(run.scalars()["grad_norm"]), rec.norms)


def test_lightning_16_mixed_gradscaler(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    from stethoscope.integrations.lightning import StethoscopeCallback

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2_lm()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Norms(pl.Callback):
        def __init__(self):
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms.append(grad_norm(pl_module.parameters()))

    cb = StethoscopeCallback(config=EVERY)
    rec = Norms()
    trainer = pl.Trainer(
        max_steps=6, accumulate_grad_batches=2, accelerator="gpu", devices=1, precision="16-mixed",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), limit_val_batches=0, callbacks=[cb, rec],
    )
    loader = torch.utils.data.DataLoader(token_rows(48), batch_size=4)
    trainer.fit(LM(), loader)
    run = st.load_run(cb.run_dir)
    assert run.status == "finished"
    _check_amp(run, 6)
    # Lightning unscales before on_before_optimizer_step: the hand-computed norm is the unscaled one
    _same_norms(list(run.scalars()["grad_norm"]), rec.norms)
