"""memory.leak: the robust growth test, the live-tensor comparison, and real training loops that leak or not."""

from __future__ import annotations

import contextlib
import ctypes
import gc

import numpy as np
import torch
from torch import nn

import stethoscope as st
from stethoscope.memory.leak import judge_window, steady, theil_sen
from stethoscope.memory.tensors import compare, snapshot

from .conftest import quiet

MIB = 2**20


# ---------------------------------------------------------------------------------------------- the statistics
def test_theil_sen_ignores_one_spike_and_steady_rejects_a_level_shift():
    steps = np.arange(40, dtype=float)
    flat = np.full(40, 500.0 * MIB)
    spiked = flat.copy()
    spiked[20] += 2000 * MIB  # one huge spike
    assert theil_sen(steps, spiked) == 0.0
    assert not steady(spiked)
    shifted = flat.copy()
    shifted[20:] += 300 * MIB  # a level shift mid-window (bigger batch, optimizer state, evaluation)
    assert theil_sen(steps, shifted) > 0  # the slope alone would call it growth...
    assert not steady(shifted)  # ...the segments do not
    rng = np.random.default_rng(0)
    leaking = flat + steps * 2 * MIB + rng.normal(0, 1 * MIB, 40)  # 2 MiB/step under 1 MiB noise
    g = judge_window(steps, leaking)
    assert g.steady
    assert 1.8 * MIB < g.slope < 2.2 * MIB
    assert 70 < g.growth_mib < 86  # slope x 39 steps


# ---------------------------------------------------------------------------------------------- snapshots
def _mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))


def test_compare_names_appended_losses_that_hold_a_graph():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    # a normal training step: backward frees the saved activations, but every kept loss still holds its graph
    for _ in range(3):
        loss = model(torch.randn(8, 64)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    a = snapshot(3)
    for _ in range(6):
        loss = model(torch.randn(8, 64)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    b = snapshot(9)
    acc = compare(a, b, steps=6)
    assert acc.pattern == "append"
    assert "scalar float32 on cpu holding an autograd graph (MeanBackward0)" in acc.cause
    assert acc.cause.startswith("6 more")
    assert ".item()" in acc.hint and ".detach()" in acc.hint
    del losses


def test_compare_names_a_running_sum_that_chains_graphs():
    model = _mlp()
    total = torch.zeros(())
    for _ in range(3):
        total = total + model(torch.randn(8, 64)).pow(2).mean()  # `total_loss += loss`
    a = snapshot(3)
    for _ in range(5):
        total = total + model(torch.randn(8, 64)).pow(2).mean()
    b = snapshot(8)
    acc = compare(a, b, steps=5)
    assert acc.pattern == "accumulate", acc
    assert "total_loss += loss.item()" in acc.hint
    del total


def test_compare_names_small_detached_tensors_kept_every_step():
    # stethoscope's own demo did this (`losses.append(loss.detach())`) and its process memory climbed about
    # 1 MiB per step through heap fragmentation: the tensors hold no graph, yet they are the cause
    model = _mlp()
    losses = []
    for _ in range(3):
        losses.append(model(torch.randn(8, 64)).pow(2).mean().detach())
    a = snapshot(3)
    for _ in range(8):
        losses.append(model(torch.randn(8, 64)).pow(2).mean().detach())
    b = snapshot(11)
    acc = compare(a, b, steps=8)
    assert acc.pattern == "append"
    assert acc.cause.startswith("8 more small tensors of scalar float32 on cpu")
    assert "deque(maxlen" in acc.hint and "fragment" in acc.hint
    del losses


def test_snapshot_keeps_no_reference_to_any_tensor():
    import weakref

    t = torch.randn(1000, 97)  # a shape no other test leaves alive in this process
    ref = weakref.ref(t)
    snap = snapshot(0)
    assert ((1000, 97), "float32", "cpu", "tensor") in snap.groups  # seen, as a description only
    del t
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------------------------- real loops
def _return_freed_memory() -> None:
    """Give the heap that earlier tests freed back to the system, so this loop's RSS starts from what is used.

    glibc keeps freed memory mapped; a leak refills it before RSS grows (docs/memory.md says so to users). In a
    test process that has already run hundreds of models the pool is larger than this loop's whole leak.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _loop(run_dir, keep, steps: int = 48) -> st.Run:
    """A monitored loop whose step computes a loss under autograd and keeps it with ``keep``.

    Nothing calls backward on it (an evaluation loop without ``torch.no_grad()``, or a logged loss that is
    not the one trained on), so a kept tensor keeps its whole graph: about 2 MiB of activations per step.
    """
    _return_freed_memory()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(4)], nn.Linear(256, 1))
    # a window of 16 steps and a 4 MiB threshold keep the test short; the defaults are 50 steps and 32 MiB
    cfg = quiet(memory={"leak_window": 16, "snapshot_gap": 4},
                thresholds=[{"pattern": "*", "rule": "memory.leak", "warning": 4}],
                sampling={"warmup_steps": 2, "every": 1000})
    kept = []
    with st.Monitor(model, run_dir=run_dir, config=cfg) as mon:
        for step in range(steps):
            with mon.step(step):
                loss = model(torch.randn(256, 256)).pow(2).mean()
                kept.append(keep(loss))
            mon.log(loss=loss.detach())
    return st.load_run(run_dir)


def test_appending_the_loss_tensor_is_a_leak_named_with_its_fix(run_dir):
    run = _loop(run_dir(), keep=lambda loss: loss)
    leaks = [f for f in run.findings if f.code == "memory.leak"]
    assert [f.target for f in leaks] == ["process.rss"]
    f = leaks[0]
    assert f.severity == "warning"
    assert f.data["pattern"] == "append"
    assert "holding an autograd graph (MeanBackward0)" in f.message
    assert "losses.append(loss.item())" in f.hint
    assert f.data["slope_bytes_per_step"] > 1 * MIB  # 2 MiB of activations per step, measured in RSS
    assert any(r["holds"] == "graph:MeanBackward0" for r in f.data["accumulating"])


def test_appending_loss_item_is_silent(run_dir):
    run = _loop(run_dir(), keep=lambda loss: loss.item())
    assert [f for f in run.findings if f.code.startswith("memory.")] == []
    mem = run.metrics_of("memory")
    # one row every memory.every (10) steps plus the sampled ones: bounded, not one per step
    assert sorted(mem["step"].tolist()) == [0, 1, 10, 20, 30, 40]
    assert (mem["rss_bytes"] > 50 * MIB).all()


def _training_loop(run_dir, keep, steps: int = 36) -> st.Run:
    """A real training loop (backward, optimizer step) that keeps each step's loss with ``keep``.

    Backward frees the saved activations, so a kept loss holds only its graph's nodes: a few KiB per step,
    far below what the RSS test can see in a short run. The periodic census finds it.
    """
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kept = []
    cfg = quiet(memory={"census_every": 10}, sampling={"warmup_steps": 2, "every": 1000})
    with st.Monitor(model, opt, run_dir=run_dir, config=cfg) as mon:
        for step in range(steps):
            with mon.step(step):
                loss = model(torch.randn(16, 64)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                kept.append(keep(loss))
            mon.log(loss=loss.detach())
    return st.load_run(run_dir)


def test_a_training_loop_appending_its_loss_is_found_by_the_census(run_dir):
    run = _training_loop(run_dir(), keep=lambda loss: loss)
    leaks = [f for f in run.findings if f.code == "memory.leak"]
    assert [f.target for f in leaks] == ["autograd.graphs"]
    f = leaks[0]
    assert f.severity == "warning" and f.data["pattern"] == "append"
    assert f.data["per_step"] >= 0.9  # one kept loss per step
    assert "holding an autograd graph (MeanBackward0)" in f.message
    assert "losses.append(loss.item())" in f.hint


def test_a_training_loop_appending_loss_item_is_silent(run_dir):
    run = _training_loop(run_dir(), keep=lambda loss: loss.item())
    assert [f for f in run.findings if f.code.startswith("memory.")] == []


def test_epoch_boundaries_are_marked_and_the_report_draws_them(run_dir):
    from stethoscope.report.content import build

    model = _mlp()
    path = run_dir()
    with st.Monitor(model, run_dir=path, config=quiet(memory={"every": 2})) as mon:
        for step in range(12):
            if step % 6 == 0:
                mon.epoch(step // 6)
            with mon.step(step):
                model(torch.randn(4, 64)).sum().backward()
    run = st.load_run(path)
    mem = run.metrics_of("memory")
    assert mem.loc[mem["step"] == 8, "epoch"].item() == 1
    section = next(s for s in build(run).sections if s.id == "memory")
    plot = section.plots[0]
    assert [label for _, label in plot.data["vlines"]] == ["epoch 0", "epoch 1"]
    assert any("process RSS" in label for label, _, _ in plot.data["series"])


def test_memory_off_writes_no_rows(run_dir):
    model = _mlp()
    path = run_dir()
    with st.Monitor(model, run_dir=path, config=quiet(memory={"enabled": False})) as mon:
        assert mon.extension("memory") is None
        for step in range(3):
            with mon.step(step):
                model(torch.randn(4, 64)).sum().backward()
    assert st.load_run(path).metrics_of("memory").empty


def test_state_round_trips_through_resume(run_dir):
    model = _mlp()
    path = run_dir()
    with st.Monitor(model, run_dir=path, config=quiet(memory={"snapshots": 1})) as mon:
        mon.epoch(0)
        with mon.step(0):
            model(torch.randn(4, 64)).sum().backward()
        mon.epoch(1)
        with mon.step(1):
            model(torch.randn(4, 64)).sum().backward()
        mon.extension("memory").investigations_left = 0  # as if its one investigation was spent
        saved = mon.extension("memory").state_dict()
    assert saved == {"investigations_left": 0, "epochs": [[0, 0], [1, 1]]}
    mon2 = st.Monitor(model, run_dir=path, config=quiet(memory={"snapshots": 1}), resume=True)
    assert mon2.extension("memory").state_dict() == saved
    mon2.close()
