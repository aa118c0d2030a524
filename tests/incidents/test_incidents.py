"""Incident capture and replay on a real (tiny, seeded) transformer trained from a shuffled DataLoader.

At step ``K`` one weight of ``transformer.h.1.attn.c_attn`` is set to +inf inside the step: that module's
output goes non-finite while its input is finite, the loss and every gradient follow, and AdamW then writes
NaN into every weight. The capture must keep the weights from before that update, the batch, and its
indices; the replay must name the injected module.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

import stethoscope as st
from stethoscope import cli
from stethoscope.errors import StethoscopeError
from stethoscope.incidents import IncidentError, SkipSampler, replay, skip_indices
from stethoscope.incidents.capture import rng_state, rows_that_fit, set_rng_state

from .models import INJECTED, inject_inf, loader, tiny_gpt

K = 8
STEPS = 11
FACTORY = "tests.incidents.models:tiny_gpt"


def _config(**incidents) -> dict:
    return {"console": {"quiet": True}, "report": {"enabled": False}, "watchdog": {"enabled": False},
            "incidents": incidents}


def _train(run_dir, inject: bool = True, watch: bool = True, **incidents):
    """STEPS steps of the standard loop; returns (batch indices by step, (x, y) by step)."""
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = st.Monitor(model, opt, run_dir=run_dir, config=_config(**incidents))
    dl = loader()
    if watch:
        assert mon.extension("incidents").watch_loader(dl)
    truth, batches = {}, {}
    for step, (x, y, idx) in enumerate(dl):
        if step >= STEPS:
            break
        with mon.step(step):
            if inject and step == K:
                inject_inf(model)
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
        truth[step], batches[step] = idx.tolist(), (x, y)
    mon.close()
    return truth, batches, dl


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("nan") / "run"
    truth, batches, dl = _train(run_dir)
    return run_dir, truth, batches, dl


def test_nan_step_leaves_one_incident_with_the_batch_weights_and_indices(nan_run):
    run_dir, truth, batches, dl = nan_run
    folders = sorted(p.name for p in (run_dir / "incidents").iterdir() if p.is_dir())
    assert folders == [f"step-{K}"]  # the later NaN steps are the same episode
    folder = run_dir / "incidents" / f"step-{K}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == K
    assert {t["kind"] for t in manifest["triggers"]} == {"loss.nonfinite", "grad.nonfinite"}
    assert manifest["weights"]["when"] == "before_optimizer_step"
    assert manifest["batch"]["complete"] and manifest["batch"]["calls"] == 1
    assert manifest["learning_rates"][0]["lr"] == pytest.approx(1e-3)
    assert {"torch", "python"} <= set(manifest["rng"]["generators"])
    # the saved batch is that step's, exactly
    saved = torch.load(folder / "batch.pt", weights_only=True)
    x, y = batches[K]
    assert torch.equal(saved[0]["args"][0], x) and torch.equal(saved[0]["args"][1], y)
    # the weights are the ones the forward used: finite except the injected +inf, not AdamW's NaNs
    weights = torch.load(folder / "weights.pt", weights_only=True)
    w = weights[f"{INJECTED}.weight"]
    assert w[0, 0] == float("inf") and torch.isfinite(w.flatten()[1:]).all()
    assert all(torch.isfinite(v).all() for k, v in weights.items() if not k.startswith(INJECTED))
    # the indices are exactly that batch's, in skip_batches.json too
    assert manifest["indices"]["batches"] == [truth[K]]
    skip = json.loads((run_dir / "incidents" / "skip_batches.json").read_text())
    assert [b["indices"] for b in skip["batches"]] == [[truth[K]]]
    assert skip_indices(run_dir / "incidents") == set(truth[K])
    # the numerics finding that opened on the same step is recorded with the incident
    assert any(f["code"] == "numerics.nonfinite" and f["target"] == INJECTED for f in manifest["findings"]), manifest
    # the loader is given back as it was
    assert type(dl) is DataLoader and type(dl.batch_sampler).__name__ == "BatchSampler"


def test_replay_names_the_injected_module(nan_run):
    run_dir, *_ = nan_run
    result = replay(run_dir / "incidents" / f"step-{K}", factory=FACTORY)
    assert result.origin == INJECTED and result.origin_class == "Linear"
    assert result.input_nonfinite == []
    assert result.loss is not None and result.loss != result.loss  # NaN
    assert result.nonfinite_grads  # backward ran
    assert result.largest and all(a.absmax < 10 for a in result.largest)  # healthy activations on the way
    again = replay(run_dir / "incidents" / f"step-{K}", factory=FACTORY)
    assert [vars(a) for a in again.largest] == [vars(a) for a in result.largest]  # deterministic


def test_replay_cli_with_factory(nan_run, monkeypatch, capsys, console_text, tmp_path):
    run_dir, *_ = nan_run
    folder = run_dir / "incidents" / f"step-{K}"
    monkeypatch.setattr(sys, "argv", ["stethoscope", "replay", str(folder), "--factory", FACTORY,
                                      "--out", str(tmp_path)])
    cli.main()
    out = console_text.getvalue()
    assert f"first non-finite module: {INJECTED} (Linear)" in " ".join(out.split())
    assert (tmp_path / "trace.jsonl").is_file()
    monkeypatch.setattr(sys, "argv", ["stethoscope", "replay", str(folder), "--factory", FACTORY, "--json"])
    cli.main()
    assert json.loads(capsys.readouterr().out)["origin"] == INJECTED


def test_replay_cli_errors_are_one_line(nan_run, monkeypatch, console_text, tmp_path):
    run_dir, *_ = nan_run
    cases = [
        [str(run_dir / "incidents" / f"step-{K}")],  # no model source
        [str(tmp_path), "--factory", FACTORY],  # not an incident folder
        [str(run_dir / "incidents" / f"step-{K}"), "--factory", "tests.incidents.models"],  # no colon
        [str(run_dir / "incidents" / f"step-{K}"), "--factory", "tests.incidents.models:nope"],
    ]
    for args in cases:
        monkeypatch.setattr(sys, "argv", ["stethoscope", "replay", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == 2
        lines = console_text.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), lines
        console_text.seek(0)
        console_text.truncate()


def test_replay_refuses_weights_of_another_model(nan_run):
    run_dir, *_ = nan_run
    from stethoscope.demo.model import GPTConfig, TinyGPT

    other = TinyGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(IncidentError, match="do not fit the model"):
        replay(run_dir / "incidents" / f"step-{K}", other)


def test_healthy_twin_leaves_no_incident(tmp_path):
    _train(tmp_path / "run", inject=False)
    assert not (tmp_path / "run" / "incidents").exists()


def test_weights_after_step_are_said_to_be(tmp_path):
    _train(tmp_path / "run", weights="after_step", watch=False)
    folder = tmp_path / "run" / "incidents" / f"step-{K}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["weights"]["when"] == "after_optimizer_step"
    assert manifest["indices"]["available"] is False and "watch_loader" in manifest["indices"]["note"]
    result = replay(folder, factory=FACTORY)
    assert any("after the optimizer's step" in n for n in result.notes)
    assert result.origin != INJECTED  # AdamW's NaN weights: the replay cannot see the true origin, and says why


def test_batch_over_the_cap_keeps_its_first_rows(tmp_path):
    # two (4, 16) int64 tensors: 256 bytes per row of the batch, 1024 in all; 600 bytes keep 2 rows
    _train(tmp_path / "run", max_batch_mb=600 / 2**20, watch=False)
    folder = tmp_path / "run" / "incidents" / f"step-{K}"
    batch = json.loads((folder / "manifest.json").read_text())["batch"]
    assert batch["complete"] is False and batch["rows_kept"] == 2
    assert batch["bytes_full"] == 1024 and batch["bytes_saved"] == 512
    assert [t["saved_shape"] for t in batch["tensors"]] == [[2, 16], [2, 16]]
    assert [t["shape"] for t in batch["tensors"]] == [[4, 16], [4, 16]]
    result = replay(folder, factory=FACTORY)
    assert result.origin == INJECTED and any("first 2 rows" in n for n in result.notes)


def test_batch_under_one_row_saves_shapes_only_and_replay_says_why(tmp_path):
    _train(tmp_path / "run", max_batch_mb=100 / 2**20, watch=False)
    folder = tmp_path / "run" / "incidents" / f"step-{K}"
    batch = json.loads((folder / "manifest.json").read_text())["batch"]
    assert batch["rows_kept"] == 0 and batch["bytes_saved"] == 0
    with pytest.raises(IncidentError, match="max_batch_mb"):
        replay(folder, factory=FACTORY)


def test_rows_that_fit():
    a, b, s = torch.zeros(10, 3), torch.zeros(10, dtype=torch.int64), torch.zeros(())
    assert rows_that_fit([a, b], 10**6) is None
    assert rows_that_fit([a, b, s], 4 + 5 * (12 + 8)) == 5  # the 0-dim tensor is always kept whole
    assert rows_that_fit([a], 11) == 0


def test_rng_state_round_trip():
    import random

    state = rng_state()
    first = (torch.rand(3), random.random())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1]


def test_skip_sampler_leaves_out_the_incident_batch(nan_run):
    run_dir, truth, *_ = nan_run
    from .models import Tokens

    ds = Tokens()
    kept = list(SkipSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(2)),
                            run_dir / "incidents" / "skip_batches.json"))
    assert set(kept) == set(range(len(ds))) - set(truth[K]) and len(kept) == len(ds) - 4


def test_skip_indices_names_a_missing_file(tmp_path):
    with pytest.raises(StethoscopeError, match="does not exist"):
        skip_indices(tmp_path / "skip_batches.json")


def test_gpt2_kwargs_batch_replayed_from_a_checkpoint(tiny_gpt2, tmp_path):
    """A transformers GPT-2 called with keyword inputs; the replay loads MODEL_DIR offline."""
    model = tiny_gpt2
    model.save_pretrained(tmp_path / "ckpt")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = st.Monitor(model, opt, run_dir=tmp_path / "run", config=_config())
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        ids = torch.randint(0, 128, (2, 8), generator=g)
        with mon.step(step):
            if step == 2:
                with torch.no_grad():
                    model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
    mon.close()
    folder = tmp_path / "run" / "incidents" / "step-2"
    saved = torch.load(folder / "batch.pt", weights_only=True)
    assert set(saved[0]["kwargs"]) == {"input_ids", "labels"}
    result = replay(folder, model_dir=tmp_path / "ckpt")
    assert result.origin == "transformer.h.1.mlp.c_fc"
    assert result.loss_source == "the model's own loss"


# ---------------------------------------------------------------------------------------------- which weights
def _skip_on_nan_loss(run_dir, **incidents) -> dict:
    """The loop many users write: no optimizer step when the loss is not finite. Returns the manifest."""
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with st.Monitor(model, opt, run_dir=run_dir, config=_config(weights="after_step", **incidents)) as mon:
        for step, (x, y, _) in enumerate(loader()):
            if step >= K + 2:
                break
            with mon.step(step):
                if step == K:
                    inject_inf(model)
                _, loss = model(x, y)
                loss.backward()
                if torch.isfinite(loss):
                    opt.step()
                opt.zero_grad(set_to_none=True)
            mon.log(loss=loss.detach())
    return json.loads((run_dir / "incidents" / f"step-{K}" / "manifest.json").read_text())


def test_a_skipped_update_saves_the_forwards_weights_and_says_so(tmp_path):
    manifest = _skip_on_nan_loss(tmp_path / "run")
    assert manifest["weights"]["when"] == "unchanged_by_step"
    assert "did not step" in manifest["weights"]["note"]
    saved = torch.load(tmp_path / "run" / "incidents" / f"step-{K}" / "weights.pt", weights_only=True)
    assert torch.isinf(saved[f"{INJECTED}.weight"]).any()  # the injected +inf, not an update's NaN
    assert not any(torch.isnan(t).any() for t in saved.values())


def test_auto_reads_no_gradient_norm_where_it_would_wait_for_a_device(tmp_path, monkeypatch):
    """``auto`` on an accelerator (the CPU road stands in for it): no host read at the optimizer's step, so the
    weights are the step's end, said to be after the update."""
    from stethoscope import stats

    monkeypatch.setattr(stats, "reads_host", lambda device: False)
    _train(tmp_path / "run", weights="auto")
    manifest = json.loads((tmp_path / "run" / "incidents" / f"step-{K}" / "manifest.json").read_text())
    assert manifest["grad_norm"] is None
    assert manifest["weights"]["when"] == "after_optimizer_step"
    assert "accelerator" in manifest["weights"]["note"]


def test_auto_on_host_memory_copies_before_the_update(nan_run):
    run_dir = nan_run[0]  # the default config: auto, on the CPU
    manifest = json.loads((run_dir / "incidents" / f"step-{K}" / "manifest.json").read_text())
    assert manifest["weights"]["when"] == "before_optimizer_step"


# ---------------------------------------------------------------------------------------------- where users read
def test_findings_and_report_say_how_to_replay_the_incident(nan_run, console_text, monkeypatch, capsys):
    from stethoscope.report import build
    from stethoscope.report.markdown import render_markdown_content

    run_dir = nan_run[0]
    run = st.load_run(run_dir)
    root = run.incidents[0].root
    assert run.capture_of(root)["folder"] == f"incidents/step-{K}"
    monkeypatch.setattr(sys, "argv", ["stethoscope", "findings", str(run_dir)])
    cli.main()
    out = " ".join(console_text.getvalue().split())  # unwrapped
    monkeypatch.setattr(sys, "argv", ["stethoscope", "findings", str(run_dir), "--json"])
    cli.main()
    assert json.loads(capsys.readouterr().out)["incidents"][0]["replay"] == f"incidents/step-{K}"
    assert f"Replay it: `stethoscope replay {run_dir}/incidents/step-{K} --factory pkg.mod:fn`" in out
    assert "the weights the failing forward used" in out
    page = render_markdown_content(build(run))
    assert f"stethoscope replay RUN_DIR/incidents/step-{K}" in page


def test_overwrite_removes_an_earlier_runs_incidents(nan_run, tmp_path):
    import shutil

    path = tmp_path / "run"
    shutil.copytree(nan_run[0], path)  # a run that left incidents/step-K
    model = tiny_gpt()
    with st.Monitor(model, run_dir=path, config=_config(), overwrite=True) as mon, mon.step(0):
        model(*next(iter(loader()))[:2])[1].backward()
    assert not (path / "incidents").exists()  # its replay hints would point at another run's batch
    assert st.load_run(path).captures == []


def test_a_demo_incident_replays_as_printed_and_names_the_module_whose_own_code_made_the_nan(tmp_path):
    """The nan pathology divides attention scores by 0 inside ``transformer.h.2.attn``'s own forward: its child
    ``c_proj`` is the first call to *finish* non-finite, but on an input already non-finite — not the origin.
    The demo names its factory (``incidents.factory``), so the printed replay line needs no --factory."""
    from stethoscope.demo import run_demo
    from stethoscope.report import build
    from stethoscope.report.model import replay_line

    run_dir = run_demo(steps=4, out=tmp_path / "demo", pathology="nan", quiet=True,
                       config={"report": {"enabled": False}, "watchdog": {"enabled": False}})
    run = st.load_run(run_dir)
    root = next(r for r in build(run, findings_only=True).findings if r.replay)
    assert root.code == "numerics.nonfinite" and root.target == "transformer.h.2.attn"
    assert replay_line(root, str(run_dir)).startswith(f"Replay it: `stethoscope replay {run_dir}/incidents/step-2`")
    result = replay(run_dir / "incidents" / "step-2")  # the model from the manifest's factory
    assert result.origin == "transformer.h.2.attn"
    assert result.weights.startswith("unchanged by the step")  # the demo skips the update on a NaN loss


def test_a_run_that_stays_broken_copies_its_weights_once(tmp_path, monkeypatch):
    """After the first NaN every step's gradient is NaN: those steps belong to the open incident, so the
    weights are copied for its folder only — not once per step (a diverging run crawled)."""
    from stethoscope.incidents import capture as cap

    copies = []
    original = cap.cpu_state_dict
    monkeypatch.setattr(cap, "cpu_state_dict", lambda model: copies.append(1) or original(model))
    _train(tmp_path / "run")  # NaN from step K to the end (STEPS - K steps)
    assert STEPS - K > 1 and len(copies) == 1


def test_a_loss_spike_opens_an_incident_with_the_monitors_running_median(tmp_path):
    """The trigger reads the monitor's own loss check (one detector, not a second copy of it)."""
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logged = []
    with st.Monitor(model, opt, run_dir=tmp_path / "run", config=_config()) as mon:
        for step, (x, y, _) in enumerate(loader()):
            if step > K:
                break
            with mon.step(step):
                _, loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            value = loss.item() * (1000.0 if step == K else 1.0)  # a logged loss 1000x its usual level
            logged.append(value)
            mon.log(loss=value)
    folders = sorted(p.name for p in (tmp_path / "run" / "incidents").iterdir() if p.is_dir())
    assert folders == [f"step-{K}"]
    manifest = json.loads((tmp_path / "run" / "incidents" / f"step-{K}" / "manifest.json").read_text())
    [spike] = [t for t in manifest["triggers"] if t["kind"] == "loss.spike"]
    assert spike["value"] == pytest.approx(logged[K])
    assert spike["median"] == pytest.approx(sorted(logged[:K])[K // 2], rel=0.05)
