"""The CUDA code path of the monitor on a real GPU: memory readings, a real CUDA OOM, the compiled statistics
kernel, async host copies of logged scalars, update ratios within the budget (issue 17, item 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.stats import CompiledStats, finalize, tensor_stats
from tests.conftest import TinyMLP, seed_everything
from tests.core._helpers import quiet_config, rows
from tests.cuda.conftest import needs_cuda

pytestmark = [pytest.mark.cuda, needs_cuda]
DEV = "cuda"


def _mlp() -> nn.Module:
    seed_everything()
    return TinyMLP().to(DEV)


def _train(mon, model, opt, steps, log=True):
    g = torch.Generator(device=DEV).manual_seed(0)
    for step in steps:
        x = torch.randn(16, 8, device=DEV, generator=g)  # (16, 8)
        with mon.step(step):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if log:
            mon.log(loss=loss.detach())


def test_memory_rows_read_the_cuda_allocator(run_dir):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = run_dir()
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config(memory={"every": 1}))
    ballast = torch.empty(64 * 2**20, dtype=torch.uint8, device=DEV)  # 64 MiB held through the run
    _train(mon, model, opt, range(3))
    mon.close()
    mem = rows(path, "memory")
    dev = mem[mem["name"].astype(str).str.startswith("cuda")]
    assert len(dev) >= 3, mem
    assert (dev["allocated_bytes"] >= ballast.numel()).all()
    assert (dev["reserved_bytes"] >= dev["allocated_bytes"]).all()
    assert (dev["peak_bytes"] >= dev["allocated_bytes"]).all()
    assert not [f for f in st.load_run(path).findings if f.code == "monitor.error"]


class Hungry(nn.Module):
    """Asks the CUDA allocator for twice the device's memory at step ``at``: a real OutOfMemoryError."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explode:
            total = torch.cuda.get_device_properties(x.device).total_memory
            _ = torch.empty(2 * total // 4, dtype=torch.float32, device=x.device)  # never fits
        return self.proj(x)


def test_a_real_cuda_oom_writes_the_finding_and_the_dump(run_dir):
    seed_everything()
    model = nn.Sequential(nn.Linear(8, 8), Hungry(), nn.Linear(8, 4)).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = run_dir()
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config())
    raised = None
    try:
        for step in range(4):
            model[1].explode = step == 2
            with mon.step(step):
                model(torch.randn(4, 8, device=DEV)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
    except torch.OutOfMemoryError as exc:
        raised = exc
    mon.close()
    assert isinstance(raised, torch.OutOfMemoryError) and "CUDA out of memory" in str(raised)
    run = st.load_run(path)
    [f] = [f for f in run.findings if f.code == "memory.oom"]
    assert (f.severity, f.first_step, f.target) == ("critical", 2, "1")
    total = torch.cuda.get_device_properties(0).total_memory
    assert f.value == pytest.approx(2 * total / 2**20, rel=0.02)  # MiB asked for, parsed from the message
    d = f.data
    assert d["phase"] == "forward"
    assert d["cuda"]["allocated_bytes"] > 0 and d["cuda"]["reserved_bytes"] >= d["cuda"]["allocated_bytes"]
    text = (path / d["dump"]).read_text(encoding="utf-8")
    assert text.startswith("stethoscope crash dump — out of memory in step 2")
    assert "failed allocation:" in text and "cuda:0: allocated" in text
    assert run.status == "crashed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_kernel_on_cuda_matches_eager(dtype):
    engine = CompiledStats()
    g = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(6, 5, 7, device=DEV, generator=g) * 3 + 1).to(dtype)  # (6, 5, 7)
    x[0, 0, 0] = math.nan
    x[1, 2, 3] = math.inf
    x[..., 2] = 0.0  # a dead feature
    y = torch.randn(300, 129, device=DEV, generator=g).to(dtype)  # a second shape: dynamic, no recompile
    for t, features in ((x, True), (y, True), (x, False)):
        feats: list = []
        raw = engine(t, 1e-8, 3.0, features, feats, None)
        ref = tensor_stats(t, 1e-8, 3.0, features=features)
        width = t.shape[-1] if features else 0
        a = finalize(ref.cpu().numpy(), t.numel(), width)
        b = finalize(raw.detach().cpu().numpy(), t.numel(), width)
        for key in ("count", "mean", "std", "min", "max", "absmax", "norm", "zero_fraction",
                    "saturation_fraction", "nonfinite", "dead_features"):
            u, v = getattr(a, key), getattr(b, key)
            assert (math.isnan(u) and math.isnan(v)) or v == pytest.approx(u, rel=1e-4, abs=1e-5), key
    assert not engine.broken


def test_sampled_cuda_steps_use_the_compiled_engine_without_errors(run_dir):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = run_dir()
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config())  # stats.compile: auto -> CUDA compiled
    _train(mon, model, opt, range(3))
    mon.close()
    assert not [f for f in st.load_run(path).findings if f.code == "monitor.error"]
    acts = rows(path, "act", 2).set_index("name")
    assert np.isfinite(acts["norm"]).all() and len(acts) >= 3


def test_unsampled_cuda_scalars_are_copied_without_a_sync(run_dir):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = run_dir()
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config(), schedule=lambda s: s in (0, 6))
    expected = []
    g = torch.Generator(device=DEV).manual_seed(0)
    for step in range(8):
        x = torch.randn(16, 8, device=DEV, generator=g)  # (16, 8)
        unsampled = step not in (0, 6) and step - 1 not in (0, 6)  # this step and the flush of the last
        torch.cuda.synchronize()
        if unsampled:
            torch.cuda.set_sync_debug_mode("error")  # any synchronising call on this step raises
        try:
            with mon.step(step):
                loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            mon.log(loss=loss.detach())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expected.append(loss.item())
    mon.close()
    run = st.load_run(path)
    assert not [f for f in run.findings if f.code == "monitor.error"], [f.message for f in run.findings]
    losses = rows(path, "scalar")
    losses = losses[losses["name"] == "loss"]
    assert list(losses["step"]) == list(range(8))
    assert list(losses["value"]) == pytest.approx(expected, rel=1e-6)


def test_update_ratios_within_the_budget_on_cuda(run_dir):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    path = run_dir()
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config(stats={"update_budget_mb": 0.0}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(mon, model, opt, range(1))
    mon.close()
    up = rows(path, "update", 0)
    assert list(up["name"]) == ["0.weight"]  # one parameter per step under a zero budget
    p = dict(model.named_parameters())["0.weight"].detach()
    assert up.loc[0, "update_norm"] == pytest.approx((p - before["0.weight"]).norm().item(), rel=1e-4)
