"""Which steps get statistics (issue 2, item 6): the default schedule, a callable, anomaly sampling."""

from __future__ import annotations

import math

import pytest
import torch

import stethoscope as st
from stethoscope.sampling import DefaultSchedule, SpikeDetector

from ._helpers import batch, rows


def _run(model, path, steps, losses=None, **kwargs):
    """Train ``steps``; log ``losses[step]`` (a float, or a tensor) instead of the real loss when given."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = st.Monitor(model, opt, run_dir=path, **kwargs)
    for step in steps:
        x, y = batch(step)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        mon.log(loss=losses[step] if losses is not None else loss.detach())
    mon.close()
    return st.load_run(path)


def _sampled_steps(run, kind):
    df = run.metrics_of(kind)
    return sorted(set(df["step"])) if not df.empty else []


def test_default_schedule_object():
    s = DefaultSchedule(warmup_steps=3, every=5)
    assert [i for i in range(22) if s(i)] == [0, 1, 2, 5, 10, 15, 20]
    assert "warmup_steps=3" in repr(s)


def test_default_schedule_from_config(tiny_mlp, run_dir):
    run = _run(tiny_mlp, run_dir(), range(12), config={"sampling": {"warmup_steps": 3, "every": 5}})
    expected = [0, 1, 2, 5, 10]
    for kind in ("act", "grad", "update", "input"):
        assert _sampled_steps(run, kind) == expected, kind
    # scalars are written for every step, sampled or not
    assert list(run.scalars().index) == list(range(12))
    assert run.scalars()["loss"].notna().all()
    assert "DefaultSchedule(warmup_steps=3, every=5)" in run.meta["schedule"]


def test_custom_schedule_callable_overrides_the_config(tiny_mlp, run_dir):
    seen = []

    def schedule(step: int) -> bool:
        seen.append(step)
        return step % 4 == 1

    run = _run(
        tiny_mlp,
        run_dir(),
        range(10),
        schedule=schedule,
        config={"sampling": {"warmup_steps": 100, "every": 1}},
    )
    assert seen == list(range(10))
    for kind in ("act", "grad", "update"):
        assert _sampled_steps(run, kind) == [1, 5, 9], kind


def test_a_schedule_that_raises_is_one_finding_and_no_sampling(tiny_mlp, run_dir):
    def schedule(step):
        raise ValueError("bad schedule")

    run = _run(tiny_mlp, run_dir(), range(3), schedule=schedule)
    assert _sampled_steps(run, "act") == []
    errors = [f for f in run.findings if f.code == "monitor.error"]
    assert len(errors) == 1 and errors[0].target == "schedule"


@pytest.mark.parametrize("as_tensor", [False, True])
def test_nan_loss_turns_on_full_sampling_for_after_anomaly_steps(tiny_mlp, run_dir, as_tensor):
    losses = [1.0] * 20
    losses[7] = math.nan
    if as_tensor:
        losses = [torch.tensor(v) for v in losses]
    cfg = {"sampling": {"warmup_steps": 2, "every": 100, "after_anomaly": 3}}
    run = _run(tiny_mlp, run_dir(), range(20), losses=losses, config=cfg)
    assert _sampled_steps(run, "act") == [0, 1, 8, 9, 10]
    assert _sampled_steps(run, "grad") == [0, 1, 8, 9, 10]


def test_a_100x_loss_spike_turns_on_full_sampling(tiny_mlp, run_dir):
    losses = [1.0 + 0.01 * i for i in range(20)]
    losses[12] = 100.0 * losses[11]
    cfg = {"sampling": {"warmup_steps": 1, "every": 100, "after_anomaly": 2}}
    run = _run(tiny_mlp, run_dir(), range(20), losses=losses, config=cfg)
    assert _sampled_steps(run, "act") == [0, 13, 14]


def test_no_anomaly_sampling_when_after_anomaly_is_zero(tiny_mlp, run_dir):
    losses = [1.0] * 8
    losses[3] = math.nan
    cfg = {"sampling": {"warmup_steps": 1, "every": 100, "after_anomaly": 0}}
    run = _run(tiny_mlp, run_dir(), range(8), losses=losses, config=cfg)
    assert _sampled_steps(run, "act") == [0]


def test_unsampled_steps_write_no_act_or_grad_rows(tiny_mlp, run_dir):
    path = run_dir()
    _run(tiny_mlp, path, range(6), schedule=lambda step: step == 2)
    for kind in ("act", "grad", "update", "input"):
        assert set(rows(path, kind)["step"]) == {2}, kind
    metrics = st.load_run(path).metrics
    # scalars, the memory monitor's rows (every memory.every steps, sampled or not: docs/memory.md) and the step
    # time breakdown's (every perf.every steps: docs/perf.md) — host-side readings, no tensor statistics
    assert set(metrics[metrics["step"] != 2]["kind"]) == {"scalar", "memory", "perf"}


def test_spike_detector_state_round_trip():
    det = SpikeDetector(10.0, window=5, min_history=3)
    for v in (1.0, 1.1, 0.9):
        assert not det.check(v)
    assert det.check(50.0) and det.check(math.inf) and not det.check(1.2)
    other = SpikeDetector(10.0, window=5, min_history=3)
    other.load_state_dict(det.state_dict())
    assert other.state_dict() == det.state_dict()
    assert other.check(50.0)


def test_pause_measures_nothing_and_epoch_writes_a_marker(tiny_mlp, run_dir):
    path = run_dir()
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, schedule=lambda step: True)
    mon.epoch(0)
    x, y = batch(0)
    with mon.step(0):
        with mon.pause(), torch.no_grad():  # an evaluation inside a sampled step
            tiny_mlp(x * 100)
        loss = (tiny_mlp(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
    mon.epoch(1)
    with mon.pause():
        tiny_mlp(x)  # between steps: nothing either
    mon.close()
    acts = rows(path, "act")
    assert set(acts["calls"]) == {1}  # the paused forward was not counted
    assert set(acts["step"]) == {0}
    markers = rows(path, "marker")
    assert list(markers["value"]) == [0, 1] and set(markers["name"]) == {"epoch"}
    assert list(markers["step"].fillna(-1)) == [-1, 0]
