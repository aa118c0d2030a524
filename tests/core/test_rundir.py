"""The run directory on disk (issue 2, item 7): files, statuses, kill -9, torn lines, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import stethoscope as st
import stethoscope.rules
from stethoscope import rundir as rd

from ._helpers import batch, quiet_config, train

EVENT_FIELDS = {
    "schema_version",
    "id",
    "event",
    "step",
    "code",
    "severity",
    "target",
    "value",
    "threshold",
    "message",
    "hint",
    "rank",
    "data",
}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_meta_metrics_and_findings_files(tiny_mlp, run_dir):
    path = run_dir()
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config())
    meta = json.loads((path / "meta.json").read_text())
    assert meta["schema_version"] == rd.SCHEMA_VERSION and meta["status"] == "running"
    assert meta["ended_at"] is None and meta["model"]["class"] == "TinyMLP"
    assert meta["model"]["parameters"] == sum(p.numel() for p in tiny_mlp.parameters())
    assert meta["optimizer"]["class"] == "SGD" and meta["config"]["sampling"]["every"] == 1
    train(mon, tiny_mlp, opt, range(3))
    mon.findings.report(
        "test.synthetic",
        "0.weight",
        "warning",
        1e-9,
        1e-7,
        "tiny gradients",
        "raise lr",
        2,
        data={"why": "test"},
    )
    assert json.loads((path / "meta.json").read_text())["status"] == "running"
    mon.close()

    meta = json.loads((path / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["ended_at"] and meta["last_step"] == 2
    assert meta["verdict"]["status"] in ("warning", "critical")
    assert {"torch", "python", "stethoscope"} <= set(meta["versions"])

    metrics = _lines(path / "metrics.jsonl")
    assert metrics
    for line in metrics:
        assert {"schema_version", "step", "kind", "name"} <= set(line), line
        assert line["schema_version"] == rd.SCHEMA_VERSION
    kinds = {line["kind"] for line in metrics}
    assert {"act", "input", "grad", "update", "scalar"} <= kinds
    assert {line["step"] for line in metrics} == {0, 1, 2}

    events = _lines(path / "findings.jsonl")
    for ev in events:
        assert set(ev) >= EVENT_FIELDS, ev
    (ev,) = [e for e in events if e["code"] == "test.synthetic"]  # the built-in rules may add their own
    assert set(ev) >= EVENT_FIELDS
    assert ev["event"] == "open" and ev["code"] == "test.synthetic" and ev["target"] == "0.weight"
    assert ev["severity"] == "warning" and ev["step"] == 2 and ev["data"] == {"why": "test"}

    run = st.load_run(path)
    assert run.status == "finished"
    (f,) = [f for f in run.findings if f.code == "test.synthetic"]
    assert (f.code, f.target, f.first_step, f.open) == ("test.synthetic", "0.weight", 2, True)
    assert (path / "report.md").is_file()


def test_findings_fold_open_update_close(tiny_mlp, run_dir):
    path = run_dir()
    mon = st.Monitor(tiny_mlp, run_dir=path, config=quiet_config())
    log = mon.findings
    assert log.report("test.synthetic", "1", "warning", 0.2, 0.1, "m", "h", 1) is not None
    assert log.report("test.synthetic", "1", "warning", 0.205, 0.1, "m", "h", 2) is None  # not 10 % worse
    assert log.report("test.synthetic", "1", "critical", 0.5, 0.1, "m", "h", 3)["event"] == "update"
    assert log.clear("test.synthetic", "1", 4)["event"] == "close"
    mon.close()
    events = [e for e in _lines(path / "findings.jsonl") if e["code"] == "test.synthetic"]
    assert [e["event"] for e in events] == ["open", "update", "close"]
    (f,) = [f for f in st.load_run(path).findings if f.code == "test.synthetic"]
    assert (f.severity, f.first_step, f.cleared_step, f.worst_value, f.events) == ("critical", 1, 4, 0.5, 3)


def test_non_empty_run_dir_without_resume_is_an_error(tiny_mlp, run_dir):
    path = run_dir()
    path.mkdir()
    (path / "notes.txt").write_text("someone's files")
    with pytest.raises(st.RunDirError, match=r"not empty.*resume=True"):
        st.Monitor(tiny_mlp, run_dir=path)
    assert not (path / "meta.json").exists()
    # an existing empty folder is fine
    empty = run_dir()
    empty.mkdir()
    st.Monitor(tiny_mlp, run_dir=empty).close()


KILLED_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from torch import nn
    import stethoscope as st

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = st.Monitor(model, opt, run_dir=sys.argv[1],
                     config={"sampling": {"warmup_steps": 3, "every": 2}, "console": {"quiet": True}})
    for step in range(100):
        x, y = torch.randn(16, 8), torch.randn(16, 4)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        mon.log(loss=loss)
        if step == 3:
            mon.findings.report("test.synthetic", "0.weight", "warning", 1e-9, 1e-7, "m", "h", step)
        if step == 6:
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_kill_9_mid_run_leaves_a_readable_run_and_resume_continues(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(KILLED_SCRIPT)
    path = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "STETHOSCOPE_DISABLE"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]

    run = st.load_run(path)
    assert run.status == "running"  # nobody got to write "finished" or "crashed"
    m = run.metrics
    assert {0, 1, 2, 4} <= set(m[m["kind"] == "act"]["step"])  # sampled steps flushed before the kill
    assert set(run.scalars().index) >= {0, 1, 2, 3, 4, 5}
    assert "test.synthetic" in [f.code for f in run.findings]
    n_metrics, n_events = len(m), len(run.events)

    # a torn half line at the end of each file (the writer died mid-line) is skipped by every reader
    with open(path / "metrics.jsonl", "a") as fh:
        fh.write('{"schema_version": 1, "step": 7, "kind": "act", "na')
    with open(path / "findings.jsonl", "a") as fh:
        fh.write('{"schema_version": 1, "id": "x", "ev')
    run = st.load_run(path)
    assert len(run.metrics) == n_metrics and len(run.events) == n_events

    # resume: a new monitor on the same folder appends; the torn lines do not swallow new ones
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = st.Monitor(model, opt, run_dir=path, resume=True, config=quiet_config())
    assert mon.state_dict()["last_step"] >= 4
    assert mon.findings.is_open("test.synthetic", "0.weight")
    mon.findings.report("test.after_resume", "2.bias", "info", 1.0, 0.5, "m", "h", 7)
    train(mon, model, opt, range(7, 10))
    mon.close()
    run = st.load_run(path)
    assert run.status == "finished" and run.meta["resumed"] == 1
    # the first line appended after each torn line is whole (not glued to the torn fragment)
    assert "test.after_resume" in [e["code"] for e in run.events]
    assert run.scalars().loc[[7, 8, 9], "loss"].notna().all()
    m = run.metrics
    for step in (7, 8, 9):
        sub = m[m["step"] == step]
        assert len(sub[sub["kind"] == "act"]) == 4 and len(sub[sub["kind"] == "grad"]) == 4, step
    raw = (path / "metrics.jsonl").read_text().splitlines()
    readable = sum(1 for _ in rd.read_jsonl(path / "metrics.jsonl"))
    assert readable == len(raw)  # the torn fragment was cut off on resume: the resumed file is whole
    assert len(run.metrics) == readable and run.problems == []


class CountingRule:
    """A rule with state, to check that resume hands rules their state back."""

    name = "test.counting"

    def __init__(self):
        self.seen = 0
        self.detached = False

    def observe(self, record):
        self.seen += 1

    def finish(self, step):
        pass

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]

    def detach(self):
        self.detached = True


def test_resume_restores_state(tiny_mlp, run_dir, monkeypatch):
    monkeypatch.setattr(stethoscope.rules, "default_rules", lambda monitor: [CountingRule()])
    path = run_dir()
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    cfg = quiet_config(sampling={"warmup_steps": 2, "every": 3, "after_anomaly": 5})
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=cfg)
    losses = train(mon, tiny_mlp, opt, range(8))
    mon.findings.report("test.synthetic", "1", "warning", 0.3, 0.1, "m", "h", 7)
    mon.close()
    saved = json.loads((path / "state.json").read_text())
    assert saved["schema_version"] == rd.SCHEMA_VERSION and saved["last_step"] == 7
    assert saved["loss_spikes"]["history"] == pytest.approx([float(v) for v in losses])
    assert saved["rules"] == {"test.counting": {"seen": 8}}
    assert mon.context.rules[0].detached

    mon2 = st.Monitor(tiny_mlp, opt, run_dir=path, config=cfg, resume=True)
    state = mon2.state_dict()
    assert state == saved
    assert mon2.context.rules[0].seen == 8
    assert mon2.findings.is_open("test.synthetic", "1")
    # the open finding is not reported again as new
    assert mon2.findings.report("test.synthetic", "1", "warning", 0.3, 0.1, "m", "h", 8) is None
    train(mon2, tiny_mlp, opt, range(8, 10))
    mon2.close()
    run = st.load_run(path)
    assert [e["event"] for e in run.events if e["code"] == "test.synthetic"] == ["open"]
    assert sorted(set(run.scalars().index)) == list(range(10))
    assert run.meta["last_step"] == 9 and run.meta["resumed"] == 1
    assert json.loads((path / "state.json").read_text())["rules"] == {"test.counting": {"seen": 10}}


def test_state_dict_round_trip(tiny_mlp, run_dir):
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    mon = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), config=quiet_config(sampling={"after_anomaly": 4}))
    train(mon, tiny_mlp, opt, range(6))
    mon.log(loss=float("nan"))
    x, y = batch(6)
    with mon.step(6):  # the NaN loss is checked at this flush: anomaly sampling armed
        (tiny_mlp(x) - y).pow(2).mean().backward()
    mon.epoch(2)
    mon.findings.report("test.synthetic", None, "critical", 50.0, 10.0, "m", "h", 6, data={"k": [1, 2]})
    state = mon.state_dict()
    assert state["anomaly_left"] == 3 and state["epoch"] == 2 and state["last_step"] == 6
    other = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), config=quiet_config())
    other.load_state_dict(state)
    assert other.state_dict() == state
    # and through JSON, the way state.json carries it
    third = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), config=quiet_config())
    third.load_state_dict(json.loads(rd.dumps(state)))
    assert third.state_dict() == json.loads(rd.dumps(state))
    for m in (mon, other, third):
        m.close()


def test_flat_safe_cleans_a_metrics_row_as_json_safe_does():
    import math

    from stethoscope import rundir

    row = {"step": 3, "name": "h.0", "mean": 0.5, "dead_features": math.nan, "max": math.inf, "min": -math.inf,
           "big": -1.7e308, "tiny": 5e-324, "count": 7}
    assert rundir.flat_safe(row) == rundir.json_safe(row)
    assert rundir.dumps(rundir.flat_safe(row)) == rundir.dumps(row)
