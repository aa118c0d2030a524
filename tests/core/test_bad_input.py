"""Bad input and misuse (issue 2, item 9): the monitor never breaks training; misuse gets a typed error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stethoscope as st
import stethoscope.monitor.engine as engine_mod

from ._helpers import batch, quiet_config, rows, train


class NoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(x) * 2


def test_a_model_with_no_parameters(run_dir):
    model = NoParams()
    path = run_dir()
    with st.Monitor(model, run_dir=path, config=quiet_config()) as mon:
        for step in range(2):
            with mon.step(step):
                out = model(torch.randn(3, 4))
            mon.log(loss=out.mean())
    run = st.load_run(path)
    assert run.status == "finished"
    assert rows(path, "grad").empty and rows(path, "update").empty
    assert set(rows(path, "act")["name"]) == {"", "act"}
    assert [f for f in run.findings if f.code == "monitor.error"] == []
    assert run.meta["model"]["parameters"] == 0


def test_a_hook_that_raises_is_one_finding_and_training_goes_on(tiny_mlp, run_dir, monkeypatch):
    real = engine_mod.tensor_stats
    failing_shape = (16, 16)  # the first Linear's output, the ReLU's, and so Linear 2's input

    def flaky(t, *args, **kwargs):
        if tuple(t.shape) == failing_shape and kwargs.get("features"):  # outputs, not the Linear inputs
            raise RuntimeError("synthetic failure in the statistics")
        return real(t, *args, **kwargs)

    monkeypatch.setattr(engine_mod, "tensor_stats", flaky)
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    path = run_dir()
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config())
    w0 = tiny_mlp[0].weight.detach().clone()
    losses = train(mon, tiny_mlp, opt, range(4))
    mon.close()
    assert not torch.equal(w0, tiny_mlp[0].weight)  # training went on
    assert all(math.isfinite(float(v)) for v in losses)
    run = st.load_run(path)
    errors = [f for f in run.findings if f.code == "monitor.error"]
    # Linear 2's input is ReLU 1's output: measured (with its dead features) in Linear 2's pre-hook
    assert sorted(f.target for f in errors) == [
        "forward hook of 0",
        "forward hook of 1",
        "forward pre-hook of 2",
    ]
    assert all(f.events == 1 for f in errors)  # once per place, not once per step
    assert all("synthetic failure" in f.message and "traceback" in f.data for f in errors)
    acts = rows(path, "act")
    assert set(acts["name"]) == {"", "2"}  # the others are still measured, every step
    assert sorted(set(acts["step"])) == [0, 1, 2, 3]
    assert len(rows(path, "grad")) == 16


def _where_is_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    return afile


def test_unwritable_run_dir_under_a_file(tmp_path):
    afile = _where_is_file(tmp_path)
    with pytest.raises(st.RunDirError, match="not writable"):
        st.Monitor(nn.Linear(2, 2), run_dir=afile / "run")
    with pytest.raises(st.RunDirError, match="not a directory"):
        st.Monitor(nn.Linear(2, 2), run_dir=afile)
    assert afile.read_text() == "not a folder"
    assert issubclass(st.RunDirError, OSError)


def test_construction_errors_leave_the_model_unhooked(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(st.RunDirError):
        st.Monitor(model, run_dir=_where_is_file(tmp_path))
    with pytest.raises(st.MonitorUsageError, match=r"nn\.Module"):
        st.Monitor("not a model", run_dir=tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(st.MonitorUsageError, match="Optimizer"):
        st.Monitor(model, optimizer=object(), run_dir=tmp_path / "b")  # type: ignore[arg-type]
    with pytest.raises(st.MonitorUsageError, match="schedule"):
        st.Monitor(model, run_dir=tmp_path / "c", schedule=5)  # type: ignore[arg-type]
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_close_twice_and_step_after_close(tiny_mlp, run_dir):
    mon = st.Monitor(tiny_mlp, run_dir=run_dir(), config=quiet_config())
    train(mon, tiny_mlp, None, range(2))
    mon.close()
    mon.close()
    assert mon.closed
    with pytest.raises(st.MonitorClosedError, match="after close"), mon.step(5):
        pass
    with pytest.raises(st.MonitorClosedError):
        mon.log(loss=1.0)
    mon.after_backward()  # harmless after close
    assert issubclass(st.MonitorClosedError, st.StethoscopeError)


def test_nested_step_is_a_usage_error(tiny_mlp, run_dir):
    mon = st.Monitor(tiny_mlp, run_dir=run_dir(), config=quiet_config())
    with pytest.raises(st.MonitorUsageError, match="nested"), mon.step(0), mon.step(1):
        pass
    # the monitor is still usable afterwards
    train(mon, tiny_mlp, None, range(1, 3))
    mon.close()


@pytest.mark.parametrize("value", ["x", None, [1.0], torch.ones(3), {"a": 1}])
def test_log_rejects_non_numbers(tiny_mlp, run_dir, value):
    mon = st.Monitor(tiny_mlp, run_dir=run_dir(), config=quiet_config())
    with pytest.raises(st.MonitorUsageError, match="loss"):
        mon.log(loss=value)
    with mon.step(0):
        pass
    mon.log(loss=1.5, lr=torch.tensor([0.1]), n=3)  # numbers and one-element tensors are fine
    mon.close()
    scal = st.load_run(mon.run_dir).scalars()
    assert scal.iloc[0]["loss"] == 1.5 and scal.iloc[0]["lr"] == pytest.approx(0.1) and scal.iloc[0]["n"] == 3


class Devices(nn.Module):
    """Outputs a dict of a float64, a float32 and a 'meta' tensor (which has no data to summarise)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return {"f64": h.double(), "f32": h, "meta": torch.empty(3, 4, device="meta")}


def test_outputs_of_several_dtypes_and_a_meta_tensor(run_dir):
    model = Devices()
    path = run_dir()
    x = torch.randn(2, 4)
    with st.Monitor(model, run_dir=path, config=quiet_config()) as mon, mon.step(0):
        out = model(x)
        out["f32"].sum().backward()
    run = st.load_run(path)
    assert [f for f in run.findings if f.code == "monitor.error"] == []
    acts = rows(path, "act", 0)
    top = acts[acts["name"] == ""].set_index("output")
    assert set(top.index) == {"f64", "f32"}  # the meta tensor is skipped, the rest still measured
    assert top.loc["f64", "mean"] == pytest.approx(out["f64"].mean().item(), rel=1e-5)
    assert top.loc["f32", "std"] == pytest.approx(out["f32"].std().item(), rel=1e-5)
    assert not rows(path, "grad").empty


def test_a_forward_that_raises_inside_a_sampled_step(tiny_mlp, run_dir):
    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("bad batch")

    model = nn.Sequential(tiny_mlp, Boom())
    path = run_dir()
    mon = st.Monitor(model, run_dir=path, config=quiet_config())
    with pytest.raises(ValueError, match="bad batch"), mon.step(0):
        model(torch.randn(2, 8))
    assert st.load_run(path).status == "crashed"
    # the user catches it and goes on: the next steps work and the run can finish
    x, _ = batch(1)
    with mon.step(1):
        tiny_mlp(x).sum().backward()
    mon.close()
    run = st.load_run(path)
    assert run.status == "finished"
    assert [f for f in run.findings if f.code == "monitor.error"] == []
    assert 1 in set(rows(path, "act")["step"])
