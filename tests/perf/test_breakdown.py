"""The step-time breakdown in one process: phases from stamps, device events read lazily, the straggler
comparison, and perf.input_bound / perf.monitor_overhead each with an induced cause and a silent twin."""

from __future__ import annotations

import time
from typing import ClassVar

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.perf.device import DeviceTimer, device_phases
from stethoscope.perf.phases import PhaseWindow, StepStamps
from stethoscope.perf.stragglers import compare


# ---------------------------------------------------------------------------------------------- phases
def test_phases_cut_a_step_and_add_up():
    s = StepStamps(3, prev_end=10.0, entered=10.050, begun=10.052, carried=0.001,
                   forward=[(10.060, 10.080), (10.100, 10.130)], opt_start=10.200, opt_end=10.210,
                   ending=10.215, ended=10.218)
    p = s.phases()
    assert p["data"] == pytest.approx(0.049 + 0.008)  # before begin_step (less the carried monitor work) + in-step
    assert p["forward"] == pytest.approx(0.050)  # two top-level calls (gradient accumulation)
    assert p["backward"] == pytest.approx(0.140 - 0.050)  # first forward to optimizer, less forward
    assert p["optimizer"] == pytest.approx(0.010)
    assert p["monitor"] == pytest.approx(0.002 + 0.003 + 0.001)
    assert p["other"] == pytest.approx(0.005)
    assert sum(p[k] for k in ("data", "forward", "backward", "optimizer", "other", "monitor")) == \
        pytest.approx(p["total"]) == pytest.approx(0.218)


def test_a_step_without_forward_or_optimizer_puts_its_body_in_other():
    p = StepStamps(0, entered=1.0, begun=1.001, ending=1.101, ended=1.102).phases()
    assert p["forward"] == p["backward"] == p["optimizer"] == p["data"] == 0.0
    assert p["other"] == pytest.approx(0.100) and p["monitor"] == pytest.approx(0.002)


def test_window_share_leaves_out_a_step_far_longer_than_usual():
    w = PhaseWindow(10)
    for i in range(9):
        w.add(i, False, {"data": 0.01, "total": 0.1})
    w.add(9, False, {"data": 5.0, "total": 5.1})  # an evaluation between two steps
    assert w.share("data") == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- device
class FakeEvent:
    clock: ClassVar[list[float]] = [0.0]  # the "device" time a record() takes
    done: ClassVar[list[bool]] = [True]  # what query() answers

    def record(self):
        self.t = FakeEvent.clock[0]

    def query(self):
        return FakeEvent.done[0]

    def elapsed_time(self, other):
        return 1000.0 * (other.t - self.t)


def test_device_events_are_read_only_once_completed():
    timer = DeviceTimer(make_event=FakeEvent, max_pending=2)
    FakeEvent.done[0] = False
    for label, t in (("begin", 0.0), ("fwd_start", 0.01), ("fwd_end", 0.03), ("opt_start", 0.07),
                     ("opt_end", 0.08), ("end", 0.09)):
        FakeEvent.clock[0] = t
        timer.mark(label)
    timer.end_step(0)
    assert timer.poll() == []  # not completed: nothing read, nothing waited for
    FakeEvent.done[0] = True
    [(step, p)] = timer.poll()
    assert step == 0
    assert p["device_forward"] == pytest.approx(0.02) and p["device_backward"] == pytest.approx(0.04)
    assert p["device_optimizer"] == pytest.approx(0.01) and p["device_step"] == pytest.approx(0.09)
    # a stream that never drains: the oldest steps are dropped, the queue stays bounded
    FakeEvent.done[0] = False
    for step in range(1, 6):
        timer.mark("begin")
        timer.end_step(step)
    assert timer.dropped == 3 and len(timer._pending) == 2
    FakeEvent.done[0] = True


def test_device_phases_without_an_optimizer():
    FakeEvent.clock[0] = 0.0
    a, b, c = FakeEvent(), FakeEvent(), FakeEvent()
    for ev, t in ((a, 0.0), (b, 0.5), (c, 1.5)):
        FakeEvent.clock[0] = t
        ev.record()
    p = device_phases([("fwd_start", a), ("fwd_end", b), ("end", c)])
    assert p == {"device_forward": pytest.approx(0.5), "device_backward": pytest.approx(1.0)}


# ---------------------------------------------------------------------------------------------- stragglers
def _summary(rank, fwd, bwd, last=40, steps=20):
    return {"rank": rank, "last_step": last, "steps": steps,
            "medians": {"data": 0.005, "forward": fwd, "backward": bwd, "optimizer": 0.001,
                        "total": 0.006 + fwd + bwd}}


def test_the_median_rank_is_the_reference_and_waiting_ranks_are_not_slow():
    # rank 3's forward takes 15 ms more; the others wait for it in backward (DDP's all-reduce)
    peers = {r: _summary(r, 0.030, 0.025) for r in range(3)} | {3: _summary(3, 0.045, 0.010)}
    mine = compare(3, peers, min_steps=10, max_lag=5)
    assert mine["forward"]["ratio"] == pytest.approx(1.5) and mine["backward"]["ratio"] < 1
    waiting = compare(0, peers, min_steps=10, max_lag=5)
    assert waiting["backward"]["ratio"] == pytest.approx(1.0) and waiting["forward"]["ratio"] == pytest.approx(1.0)


def test_no_comparison_with_two_ranks_short_windows_or_ranks_apart():
    peers = {r: _summary(r, 0.03, 0.02) for r in range(4)}
    assert compare(0, {0: peers[0], 1: peers[1]}, 10, 5) is None
    assert compare(0, peers | {2: _summary(2, 0.03, 0.02, steps=5)}, 10, 5) is None
    assert compare(0, peers | {2: _summary(2, 0.03, 0.02, last=100)}, 10, 5) is None
    assert compare(0, peers, 10, 5) is not None


# ---------------------------------------------------------------------------------------------- findings
class Sleepy(nn.Module):
    def __init__(self, seconds: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.seconds = seconds

    def forward(self, x):
        if self.seconds:
            time.sleep(self.seconds)
        return self.lin(x)


def _train(tmp_path, name, *, data_s=0.0, forward_s=0.0, steps=24, sampling=None, perf=None):
    torch.manual_seed(0)
    model = Sleepy(forward_s)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    config = {"sampling": sampling or {"warmup_steps": 0, "every": 1000},
              "perf": {"window": 8, "publish_every": 4, **(perf or {})},
              "console": {"quiet": True}, "report": {"enabled": False}}
    mon = st.Monitor(model, optimizer=opt, run_dir=tmp_path / name, config=config)
    x = torch.randn(4, 8)
    for i in range(steps):
        if data_s:
            time.sleep(data_s)  # the "DataLoader"
        with mon.step(i):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        mon.log(loss=loss.detach())
    summary = mon.extension("perf").summary()
    mon.close()
    return st.load_run(tmp_path / name), summary


def test_input_bound_names_the_data_wait_and_its_twin_is_silent(tmp_path):
    run, summary = _train(tmp_path, "slow_data", data_s=0.030)
    [f] = [f for f in run.findings if f.code == "perf.input_bound"]
    assert f.target == "data" and f.value >= 0.5 and f.severity == "critical"
    assert "waited for its next batch" in f.message and "num_workers" in f.hint
    assert summary["data"] >= 0.030
    perf = run.metrics_of("perf")
    later = perf[perf["step"] > 0]  # the first step has no previous step to wait from
    assert not later.empty and (later["data_ms"] >= 30).all() and (later["forward_ms"] < 30).all()
    # the twin: the same time spent in forward instead of waiting for data
    twin, twin_summary = _train(tmp_path, "slow_forward", forward_s=0.030)
    assert [f for f in twin.findings if f.code.startswith("perf.")] == []
    assert twin_summary["forward"] >= 0.030 and twin_summary["data"] < 0.005
    # the report's step-time section reads the rows
    from stethoscope.perf.report import step_time

    section = step_time(run)
    [table] = section.tables
    assert table.columns[1:3] == ["data ms", "forward ms"] and table.columns[-1] == "whole step ms"
    assert table.rows[0][0] == "all steps"


def test_monitor_overhead_says_so_and_its_twin_is_silent(tmp_path):
    # every step sampled with statistics on every tensor, around a model whose step costs ~nothing
    run, summary = _train(tmp_path, "busy", steps=40, sampling={"warmup_steps": 1000, "every": 1})
    [f] = [f for f in run.findings if f.code == "perf.monitor_overhead"]
    assert f.target == "monitor" and f.value >= 0.10
    assert f.severity == "info" and run.meta["verdict"]["status"] == "healthy"  # said, never the run's verdict
    assert "stethoscope itself took" in f.message and "sampling.every" in f.hint
    assert summary["monitor"] > summary["forward"]
    # the twin: the same monitor (default statistics, nothing sampled) around a step that does real work
    twin, _ = _train(tmp_path, "quiet", steps=40, forward_s=0.050)
    assert [f for f in twin.findings if f.code.startswith("perf.")] == []
