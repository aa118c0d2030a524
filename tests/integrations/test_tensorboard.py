"""The TensorBoard sink: real SummaryWriter event files, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import stethoscope as st

CFG = {"sampling": {"warmup_steps": 2, "every": 3}, "report": {"enabled": False}, "console": {"quiet": True},
       "watchdog": {"enabled": False}}


def _train(run_dir, config, steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = st.Monitor(model, optimizer=opt, run_dir=run_dir, config=config)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
    mon.close()
    return mon


def _read(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_scalars_and_histograms_read_back(tmp_path):
    mon = _train(tmp_path / "run", CFG | {"tensorboard": {"enabled": True}})
    folder = mon.run_dir / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())
    acc = _read(folder)
    run = st.load_run(mon.run_dir)
    scalars = acc.Tags()["scalars"]

    # every step: the logged loss and the findings counts
    loss = acc.Scalars("stethoscope/loss")
    assert [e.step for e in loss] == list(range(6))
    assert [e.value for e in loss] == pytest.approx(run.scalars()["loss"].to_list(), rel=1e-6)
    for sev in ("critical", "warning", "info"):
        assert len(acc.Scalars(f"stethoscope/findings_{sev}")) == 6
    # sampled steps (0, 1, 3 with warmup 2, every 3): the grad norm and the worst zero fraction
    sampled = sorted(run.metrics_of("grad")["step"].unique())
    gn = acc.Scalars("stethoscope/grad_norm")
    assert [e.step for e in gn] == sampled
    expected = run.scalars()["grad_norm"].dropna()
    assert [e.value for e in gn] == pytest.approx(expected.to_list(), rel=1e-5)
    assert "stethoscope/zero_grad_fraction_max" in scalars

    # histograms across parameters / modules on sampled steps
    hists = acc.Tags()["histograms"]
    assert {"grads/norm_log10", "grads/zero_fraction", "updates/ratio_log10", "acts/std_log10"} <= set(hists)
    h = acc.Histograms("grads/norm_log10")
    assert [e.step for e in h] == sampled
    grads0 = run.metrics_of("grad")
    norms0 = grads0[grads0["step"] == sampled[0]]["norm"].to_numpy()
    first = h[0].histogram_value
    assert first.num == len(norms0)  # one value per parameter
    assert first.min == pytest.approx(np.log10(norms0.min()), rel=1e-5)
    assert first.max == pytest.approx(np.log10(norms0.max()), rel=1e-5)


def test_histograms_switch_and_log_dir(tmp_path):
    log_dir = tmp_path / "tb"
    mon = _train(tmp_path / "run", CFG | {"tensorboard": {"enabled": True, "histograms": False,
                                                          "log_dir": str(log_dir)}}, steps=3)
    assert not (mon.run_dir / "tensorboard").exists()
    acc = _read(log_dir)
    assert acc.Tags()["histograms"] == []
    assert len(acc.Scalars("stethoscope/loss")) == 3


def test_off_by_default_and_imports_nothing(tmp_path):
    mon = _train(tmp_path / "run", CFG, steps=2)
    assert not (mon.run_dir / "tensorboard").exists()
    assert mon.extension("tensorboard") is None
    code = ("import sys, stethoscope.sinks.tensorboard as m, stethoscope as st; "
            "print(any(k == 'tensorboard' or k.startswith(('tensorboard.', 'torch.utils.tensorboard')) "
            "for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_tensorboard_is_a_finding_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    mon = _train(tmp_path / "run", CFG | {"tensorboard": {"enabled": True}}, steps=2)
    run = st.load_run(mon.run_dir)
    errors = [f for f in run.findings if f.code == "monitor.error"]
    assert len(errors) == 1 and "pip install" in errors[0].message
    assert run.status == "finished"
