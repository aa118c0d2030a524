"""The flight recorder: DEBUG events kept in memory, nothing written at DEBUG until a crash writes them all."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.recorder.buffer import EVENT_OVERHEAD, FlightRecorder, sizeof_event
from stethoscope.recorder.dump import read_crash

from .conftest import quiet

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def user_logging():
    """The program's own logging: an INFO console-like handler and an INFO file handler on the root."""
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    console = io.StringIO()
    h_console = logging.StreamHandler(console)  # level NOTSET: prints whatever reaches it
    file_buf = io.StringIO()
    h_file = logging.StreamHandler(file_buf)
    h_file.setLevel(logging.INFO)
    root.addHandler(h_console)
    root.addHandler(h_file)
    root.setLevel(logging.INFO)
    yield console, file_buf
    root.removeHandler(h_console)
    root.removeHandler(h_file)
    root.setLevel(old_level)
    assert root.handlers == old_handlers


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_exception_dump_holds_the_debug_events_and_nothing_was_written_before(run_dir, user_logging):
    console, file_buf = user_logging
    log = logging.getLogger("mytrain.loop")
    path = run_dir()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    factory = logging.getLogRecordFactory()
    mon = st.Monitor(model, opt, run_dir=path, config=quiet())
    boom = ValueError("bad batch at step 6")
    with pytest.raises(ValueError) as info:
        for step in range(10):
            with mon.step(step):
                log.debug("batch %d: ids %s", step, [step, step + 1])
                log.info("step %d", step)
                loss = model(torch.randn(4, 8)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                if step == 6:
                    # before the crash: nothing at DEBUG anywhere — not on the console, not in the file,
                    # not in the run directory
                    assert "batch" not in console.getvalue() and "batch" not in file_buf.getvalue()
                    assert not list(path.glob("crash-*"))
                    for f in path.iterdir():
                        if f.is_file():
                            assert "batch 5" not in f.read_text(encoding="utf-8", errors="replace")
                    raise boom
            mon.log(loss=loss)
    assert info.value is boom
    mon.close()
    assert console.getvalue().splitlines() == [f"step {i}" for i in range(7)]  # INFO, as before
    assert file_buf.getvalue().splitlines() == [f"step {i}" for i in range(7)]
    [txt] = path.glob("crash-*.txt")
    text = txt.read_text(encoding="utf-8")
    assert text.startswith("stethoscope crash dump — ValueError raised in step 6")
    assert "exception: ValueError: bad batch at step 6" in text
    header, events = read_crash(txt.with_suffix(".jsonl"))
    assert header["step"] == 6 and header["exception"]["type"] == "ValueError"
    debug = [e for e in events if e["level"] == "DEBUG" and e["source"] == "mytrain.loop"]
    assert [e["message"] for e in debug] == [f"batch {i}: ids [{i}, {i + 1}]" for i in range(7)]
    assert debug[-1]["step"] == 6
    kinds = {e["kind"] for e in events}
    assert {"log", "step", "stats", "memory"} <= kinds
    assert any(e["kind"] == "stats" and "loss" in e["message"] for e in events)
    # everything is undone at close: levels, factory, filters
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogRecordFactory() is factory
    assert all(not h.filters for h in logging.getLogger().handlers)


def test_dump_names_the_module_that_was_running(run_dir):
    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("index out of range in self")

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), Fails()))
    path = run_dir()
    with pytest.raises(RuntimeError), st.Monitor(model, run_dir=path, config=quiet()) as mon, mon.step(0):
        model(torch.randn(2, 4))
    [txt] = path.glob("crash-*.txt")
    header, _ = read_crash(txt.with_suffix(".jsonl"))
    assert header["open_modules"] == ["", "1", "1.1"]
    assert "enter  1.1" in txt.read_text(encoding="utf-8")


def test_per_logger_levels_and_basic_config_still_works(run_dir):
    root = logging.getLogger()
    old = root.level, list(root.handlers)
    root.handlers.clear()  # a program with no logging set up yet (pytest's own handlers put back below)
    noisy = logging.getLogger("noisy.lib")
    path = run_dir()
    mon = st.Monitor(_model(), run_dir=path, config=quiet(recorder={"levels": {"noisy": "WARNING", "chatty": "debug"}}))
    try:
        assert root.level == logging.DEBUG and logging.getLogger("noisy").level == logging.WARNING
        buf = io.StringIO()
        logging.basicConfig(stream=buf, level=logging.INFO, format="%(name)s %(message)s")  # after the monitor
        assert len(root.handlers) == 1  # the recorder added no handler, so basicConfig did its work
        with mon.step(0):
            noisy.debug("hidden")
            noisy.warning("shown warning")
            logging.getLogger("chatty").debug("chatty detail")
            logging.getLogger("app").debug("app detail")
            logging.getLogger("app").info("app info")
        assert buf.getvalue().splitlines() == ["noisy.lib shown warning", "app app info"]
        assert root.level == logging.DEBUG  # basicConfig's INFO became the floor of the outputs
        rec = mon.extension("recorder").recorder
        texts = [e[5] for e in rec.events]
        assert "hidden" not in texts
        assert {"shown warning", "chatty detail", "app detail", "app info"} <= set(texts)
    finally:
        mon.close()
        assert root.level == logging.INFO  # what the program asked for last
        root.handlers[:] = old[1]
        root.setLevel(old[0])
    assert logging.getLogger("noisy").level == logging.NOTSET


def test_nonfinite_loss_dumps_only_when_configured(run_dir):
    for on, expected in ((True, 1), (False, 0)):
        path = run_dir()
        model = _model()
        with st.Monitor(model, run_dir=path, config=quiet(recorder={"on_nonfinite_loss": on})) as mon:
            for step in range(4):
                with mon.step(step):
                    model(torch.randn(2, 8)).sum().backward()
                mon.log(loss=float("nan") if step >= 2 else 1.0)
        dumps = list(path.glob("crash-*.txt"))
        assert len(dumps) == expected
        if dumps:
            assert "non-finite loss (nan) at step 2" in dumps[0].read_text(encoding="utf-8")


def test_recorder_off_leaves_logging_alone(run_dir):
    root = logging.getLogger()
    level, factory = root.level, logging.getLogRecordFactory()
    path = run_dir()
    with pytest.raises(ValueError), st.Monitor(_model(), run_dir=path, config=quiet(recorder={"enabled": False})) as mon:
        assert root.level == level and logging.getLogRecordFactory() is factory
        with mon.step(0):
            raise ValueError("x")
    assert not list(path.glob("crash-*"))


def test_ring_is_bounded_and_the_bound_holds():
    rec = FlightRecorder(capacity=64, max_entry_chars=200, module_capacity=32)
    for i in range(1000):
        rec.step = i
        rec.add("log", "x", "m" * (i % 500))
        rec.module(f"layer{i % 7}", i % 2 == 0)
    assert len(rec.events) == 64 and len(rec.modules) == 32
    assert rec.dropped == 1000 - 64
    assert all(len(e[5]) <= 200 for e in rec.events)
    assert max(sizeof_event(e) - len(e[5]) for e in rec.events) <= EVENT_OVERHEAD
    assert max(sys.getsizeof(e) + sys.getsizeof(e[0]) + sys.getsizeof(e[1]) for e in rec.modules) <= 128
    assert rec.bound_bytes() == 64 * (200 + EVENT_OVERHEAD) + 32 * 128
    assert st.Config().recorder.capacity * (st.Config().recorder.max_entry_chars + EVENT_OVERHEAD) < 5 * 2**20


_SIGTERM_SCRIPT = textwrap.dedent("""
    import logging, sys, time
    import torch
    from torch import nn
    import stethoscope as st
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = st.Monitor(model, opt, run_dir=sys.argv[1],
                     config={"console": {"quiet": True}, "report": {"enabled": False}})
    log = logging.getLogger("train")
    for step in range(1000):
        with mon.step(step):
            log.debug("debug line of step %d", step)
            model(torch.randn(2, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 3:
                print("ready", flush=True)
                time.sleep(60)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_in_a_real_process_writes_the_dump(tmp_path):
    path = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM  # the default action still ran after the dump
    [txt] = path.glob("crash-*.txt")
    text = txt.read_text(encoding="utf-8")
    assert text.startswith("stethoscope crash dump — SIGTERM received")
    assert "debug line of step 3" in text
    assert "Python stacks of all threads" in text
    assert re.search(r'File "<string>", line 1[89], in <module>', text)  # the print or the sleep
    meta = json.loads((path / "meta.json").read_text())
    assert meta["status"] == "crashed" and "SIGTERM" in meta["error"]


def test_level_names_are_validated():
    cfg = st.load_config({"recorder": {"level": "warn", "levels": {"urllib3": "error"}}})
    assert cfg.recorder.level == "WARNING" and cfg.recorder.levels == {"urllib3": "ERROR"}
    with pytest.raises(st.ConfigError, match="not a logging level: 'LOUD'"):
        st.load_config({"recorder": {"level": "LOUD"}})
