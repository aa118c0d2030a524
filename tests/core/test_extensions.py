"""The extension protocol: every hook is driven at its moment, failures are contained, state round-trips."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.extensions import Extension, build_extensions


class Recorder(Extension):
    name = "recorder-test"

    def __init__(self):
        self.calls: list[tuple] = []
        self.restored = None

    def begin_step(self, step, sampled):
        self.calls.append(("begin", step, sampled))

    def end_step(self, step, failed):
        self.calls.append(("end", step, type(failed).__name__ if failed else None))

    def observe(self, record):
        self.calls.append(("observe", record.step))

    def close(self, status):
        self.calls.append(("close", status))

    def state_dict(self):
        return {"seen": len(self.calls)}

    def load_state_dict(self, state):
        self.restored = state


@pytest.fixture
def fake_module(monkeypatch):
    made: list[Recorder] = []
    mod = types.ModuleType("stethoscope_test_ext")

    def extension(monitor):
        ext = Recorder()
        made.append(ext)
        return ext

    mod.extension = extension
    monkeypatch.setitem(sys.modules, "stethoscope_test_ext", mod)
    monkeypatch.setattr("stethoscope.extensions.BUILTIN_EXTENSIONS", ("stethoscope_test_ext",))
    return made


def test_hooks_run_in_order_and_exceptions_pass_through(tmp_path, fake_module):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = st.Monitor(model, opt, run_dir=tmp_path / "run", config={"console": {"quiet": True},
                                                                  "report": {"enabled": False}})
    ext = fake_module[0]
    assert mon.extension("recorder-test") is ext
    for step in range(2):
        with mon.step(step):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    with pytest.raises(ValueError), mon.step(2):
        raise ValueError("boom")
    mon.close()
    kinds = list(ext.calls)
    assert kinds[:2] == [("begin", 0, True), ("end", 0, None)]
    assert ("observe", 0) in kinds and ("observe", 1) in kinds
    assert ("end", 2, "ValueError") in kinds
    assert kinds[-1] == ("close", "crashed")
    assert kinds.index(("observe", 0)) > kinds.index(("end", 0, None))


def test_state_round_trips_through_resume(tmp_path, fake_module):
    model = nn.Linear(4, 2)
    cfg = {"console": {"quiet": True}, "report": {"enabled": False}}
    mon = st.Monitor(model, run_dir=tmp_path / "run", config=cfg)
    with mon.step(0):
        model(torch.randn(3, 4)).sum().backward()
    mon.close()
    saved = fake_module[0].state_dict()
    mon2 = st.Monitor(model, run_dir=tmp_path / "run", config=cfg, resume=True)
    assert fake_module[1].restored == saved
    mon2.close()


def test_failing_extension_is_reported_not_raised(tmp_path, monkeypatch):
    mod = types.ModuleType("stethoscope_bad_ext")

    class Bad(Extension):
        name = "bad"

        def end_step(self, step, failed):
            raise RuntimeError("extension bug")

    mod.extension = lambda monitor: Bad()
    monkeypatch.setitem(sys.modules, "stethoscope_bad_ext", mod)
    monkeypatch.setattr("stethoscope.extensions.BUILTIN_EXTENSIONS",
                        ("stethoscope_bad_ext", "stethoscope.nope.extension"))
    model = nn.Linear(4, 2)
    mon = st.Monitor(model, run_dir=tmp_path / "run", config={"console": {"quiet": True},
                                                             "report": {"enabled": False}})
    with mon.step(0):
        model(torch.randn(3, 4)).sum()
    mon.close()
    run = st.load_run(tmp_path / "run")
    errors = [f for f in run.findings if f.code == "monitor.error"]
    assert errors and "extension bad" in errors[0].target + errors[0].message


def test_absent_module_is_skipped_silently():
    class FakeMonitor:
        def __init__(self):
            self.errors = []

        def _record_error(self, where, exc):
            self.errors.append(where)

    mon = FakeMonitor()
    assert build_extensions(mon, ("stethoscope.not_a_feature.extension",)) == []
    assert mon.errors == []


def test_begin_end_step_without_a_with_block(tmp_path):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = st.Monitor(model, opt, run_dir=tmp_path / "run", config={"console": {"quiet": True},
                                                                  "report": {"enabled": False}})
    for step in range(3):
        mon.begin_step(step)
        assert mon.in_step
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        mon.end_step()
        assert not mon.in_step
    mon.end_step()  # nothing open: a no-op
    mon.close()
    run = st.load_run(tmp_path / "run")
    assert set(run.metrics_of("grad")["step"]) == {0, 1, 2}


def test_add_extension_drives_it_and_refuses_a_duplicate_name(tmp_path):
    model = nn.Linear(4, 2)
    mon = st.Monitor(model, run_dir=tmp_path / "run", config={"console": {"quiet": True},
                                                             "report": {"enabled": False}})
    ext = Recorder()
    mon.add_extension(ext)
    with pytest.raises(st.MonitorUsageError, match="already attached"):
        mon.add_extension(Recorder())
    with mon.step(0):
        model(torch.randn(3, 4)).sum().backward()
    mon.close()
    assert ext.calls[0] == ("begin", 0, True) and ext.calls[-1] == ("close", "finished")
    with pytest.raises(st.MonitorClosedError):
        mon.add_extension(Recorder())
