"""The Hugging Face Trainer with StethoscopeCallback: a tiny GPT-2, CPU, gradient accumulation 2."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments

import stethoscope as st
from stethoscope.integrations.hf import StethoscopeCallback
from tests.integrations.conftest import FAST, TokenDataset, grad_norm, tiny_gpt2_lm


class Recorder(TrainerCallback):
    """Records the events the monitor cares about, and the true gradient norm where it reads gradients."""

    def __init__(self, cb: StethoscopeCallback):
        self.cb = cb
        self.events: list[str] = []
        self.norms: list[float] = []
        self.paused: list[bool] = []

    def on_step_begin(self, args, state, control, **kw):
        self.events.append("step_begin")

    def on_substep_end(self, args, state, control, **kw):
        self.events.append("substep_end")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.events.append("pre_optimizer_step")
        assert self.cb.monitor.in_step
        self.norms.append(grad_norm(model.parameters()))

    def on_step_end(self, args, state, control, **kw):
        self.events.append("step_end")
        assert not self.cb.monitor.in_step

    def on_prediction_step(self, args, state, control, **kw):
        self.paused.append(self.cb.monitor.heartbeat.paused)


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=4, logging_steps=1, learning_rate=1e-3, report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, eval_strategy="steps", eval_steps=2,
        per_device_eval_batch_size=4, seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_one_monitored_step_per_optimizer_step(tmp_path):
    cb = StethoscopeCallback(config=FAST)
    rec = Recorder(cb)
    trainer = Trainer(model=tiny_gpt2_lm(), args=_args(tmp_path), train_dataset=TokenDataset(16),
                      eval_dataset=TokenDataset(4, seed=1), callbacks=[cb, rec])
    trainer.train()

    # the run directory sits under the Trainer's output_dir and is closed as finished
    assert cb.run_dir == tmp_path / "out" / "stethoscope"
    assert cb.monitor.closed
    meta = json.loads((cb.run_dir / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["last_step"] == 3
    assert (cb.run_dir / "report.md").is_file()

    # accumulation 2: 8 micro-batches, 4 optimizer steps, 4 monitored steps
    assert rec.events.count("substep_end") == 4 and rec.events.count("step_end") == 4
    run = st.load_run(cb.run_dir)
    grads = run.metrics_of("grad")
    assert sorted(grads["step"].unique()) == [0, 1, 2, 3]
    # gradients were read at on_pre_optimizer_step, after the Trainer clipped them (max_grad_norm=1)
    norms = run.scalars()["grad_norm"].to_numpy()
    assert norms == pytest.approx(rec.norms, rel=1e-4)
    assert max(rec.norms) <= 1.0 + 1e-5
    # the loss the Trainer logged reached the monitor at the step it belongs to
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert run.scalars()["loss"].to_numpy() == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert "eval_loss" in run.scalars()

    # evaluation ran inside mon.pause()
    assert rec.paused and all(rec.paused)

    # only plain floats went into the Trainer's logs, in its history too
    for entry in trainer.state.log_history:
        ours = {k: v for k, v in entry.items() if k.startswith("stethoscope/")}
        assert {"stethoscope/findings_critical", "stethoscope/findings_warning",
                "stethoscope/findings_info", "stethoscope/zero_grad_fraction_max"} <= set(ours)
        assert all(type(v) is float for v in ours.values())
    last = trainer.state.log_history[-1]
    assert last["stethoscope/findings_critical"] == float(run.verdict["counts"]["critical"])
    assert 0.0 <= last["stethoscope/zero_grad_fraction_max"] <= 1.0

    # the hooks are gone: a forward after training records nothing
    assert cb.monitor.hooks_attached == 0


def test_second_train_call_gets_a_new_run_directory(tmp_path):
    cb = StethoscopeCallback(config=FAST)
    trainer = Trainer(model=tiny_gpt2_lm(), args=_args(tmp_path, max_steps=1, eval_strategy="no"),
                      train_dataset=TokenDataset(8), callbacks=[cb])
    trainer.train()
    first = cb.run_dir
    trainer.train()
    assert first.name == "stethoscope" and cb.run_dir.name == "stethoscope-2"
    assert st.load_run(cb.run_dir).status == "finished"


class Boom(RuntimeError):
    pass


def test_exception_in_training_closes_the_run_as_crashed(tmp_path):
    model = tiny_gpt2_lm()
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 3:  # the second optimizer step's first micro-batch
            raise Boom("data went bad")

    model.transformer.h[1].register_forward_pre_hook(explode)
    cb = StethoscopeCallback(config=FAST)
    trainer = Trainer(model=model, args=_args(tmp_path, eval_strategy="no"), train_dataset=TokenDataset(16),
                      callbacks=[cb])
    with pytest.raises(Boom):
        trainer.train()
    # the Trainer has no exception event: the callback closes the run at interpreter exit; do it now
    assert not cb.monitor.closed
    cb._driver._at_exit()
    run = st.load_run(cb.run_dir)
    assert run.status == "crashed"
    assert "end event" in run.meta["error"]
    grads = run.metrics_of("grad")
    assert sorted(grads[~grads["missing"].astype(bool)]["step"].unique()) == [0]  # step 1 died in forward


def test_config_mistakes_fail_when_the_callback_is_made():
    with pytest.raises(st.ConfigError, match="sampling"):
        StethoscopeCallback(config={"sampling": {"evry": 3}})


def test_disabled_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STETHOSCOPE_DISABLE", "1")
    cb = StethoscopeCallback(config=FAST)
    trainer = Trainer(model=tiny_gpt2_lm(), args=_args(tmp_path, max_steps=1, eval_strategy="no"),
                      train_dataset=TokenDataset(4), callbacks=[cb])
    trainer.train()
    assert cb.monitor.disabled
    assert not (tmp_path / "out" / "stethoscope").exists()
    assert not any(k.startswith("stethoscope/") for h in trainer.state.log_history for k in h)


def test_optimizer_wrapper_is_unwrapped():
    from accelerate.optimizer import AcceleratedOptimizer

    from stethoscope.integrations._driver import unwrap_optimizer

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert unwrap_optimizer(AcceleratedOptimizer(opt, device_placement=False)) is opt
    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(None) is None


def test_a_nan_step_under_the_trainer_saves_that_steps_batch_and_dataset_indices(tmp_path):
    """The callback watches the Trainer's own (shuffled, accelerate-wrapped) train dataloader: the incident of
    the optimizer step whose forward went NaN holds the dataset indices of its micro-batches, and the saved
    batch is exactly those examples."""
    model = tiny_gpt2_lm()
    calls = {"n": 0}
    bad_step = 2  # optimizer steps 0, 1 are healthy; step 2's micro-batches are calls 4 and 5

    def poison(module, args):
        calls["n"] += 1
        if calls["n"] == 2 * bad_step + 1:
            with torch.no_grad():
                module.weight[0, 0] = float("inf")  # c_attn of block 1: its output and the loss go non-finite

    model.transformer.h[1].attn.c_attn.register_forward_pre_hook(poison)
    data = TokenDataset(16)
    cb = StethoscopeCallback(config=FAST)
    trainer = Trainer(model=model, args=_args(tmp_path, eval_strategy="no"), train_dataset=data, callbacks=[cb])
    trainer.train()
    folder = cb.run_dir / "incidents" / f"step-{bad_step}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["indices"]["available"], manifest["indices"]
    batches = manifest["indices"]["batches"]  # one list of dataset indices per micro-batch
    assert [len(b) for b in batches] == [2, 2]
    calls_saved = torch.load(folder / "batch.pt", weights_only=True)
    assert len(calls_saved) == 2
    for call, indices in zip(calls_saved, batches, strict=True):
        expected = torch.stack([torch.as_tensor(data[i]["input_ids"]) for i in indices])
        assert torch.equal(call["kwargs"]["input_ids"], expected)
    skip = json.loads((cb.run_dir / "incidents" / "skip_batches.json").read_text())
    assert skip["batches"][0]["indices"] == batches
    # watching accelerate's DataLoaderShard (whose __class__ is a read-only property) raised inside the
    # callback before: a monitor.error finding in every Trainer run
    assert [f.code for f in st.load_run(cb.run_dir).findings if f.code == "monitor.error"] == []
