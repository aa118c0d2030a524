"""The hang watchdog on real stalls: a sleeping module, a torch.compile first call, a slow Dataset, none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.watchdog import HangError

from .conftest import watchdog_config


class Sleeper(nn.Module):
    """A linear layer that sleeps ``delay`` seconds first: a stand-in for a stuck operation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.delay = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)  # the line the dump must quote
        return self.lin(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), Sleeper())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def events(run_dir: Path, code: str = "hang.stall") -> list[dict]:
    path = run_dir / "findings.jsonl"
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["code"] == code]


def dumps(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("hang-*.txt"))


def test_sleeping_module_dump_names_full_path_and_user_code(run_dir):
    model, rd = Net(), run_dir()
    # The first call sleeps 0.5 s, under its first-call allowance (30 s); the second call's 0.8 s is a stall.
    mon = st.Monitor(model, run_dir=rd, config=watchdog_config(stall=0.25, first=30.0))
    x = torch.randn(2, 4)
    model.block[1].delay = 0.5
    with mon.step(0):
        model(x)
    assert not dumps(rd), "a first call within first_call_stall_seconds is not a stall"
    model.block[1].delay = 0.8
    with mon.step(1):
        model(x)
    mon.close()

    [dump] = dumps(rd)
    text = dump.read_text()
    assert "module path (outermost to innermost):\n  <model>\n    block\n      block.1\n" in text
    assert "classification: user code" in text
    assert "test_watchdog.py" in text.split("decided by:")[1].splitlines()[0]
    assert "time.sleep(self.delay)" in text  # the stacks of all threads, with source lines
    assert "[training thread]" in text and "(no CUDA device in use)" in text

    opened, closed = events(rd)
    assert (opened["event"], opened["severity"], opened["target"], opened["step"]) == (
        "open",
        "warning",
        "block.1",
        1,
    )
    assert opened["data"]["stack"] == ["<model>", "block", "block.1"]
    assert opened["data"]["classification"] == "user code" and not opened["data"]["first_call"]
    assert opened["threshold"] == 0.25 and opened["value"] >= 0.25
    assert closed["event"] == "close" and 0.7 < closed["value"] < 2.0  # how long it was stuck in all


def test_torch_compile_first_call_is_compiling_and_closes(run_dir):
    dynamo = pytest.importorskip("torch._dynamo")
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this build")
    dynamo.reset()  # a cached graph from another test would skip the compile

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(20):  # enough ops that tracing takes well over the 0.1 s threshold
                x = torch.tanh(self.lin(x)) + x.sin()
            return x

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.compile(Inner(), backend="aot_eager")  # no C++ build

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model, rd = Outer(), run_dir()
    mon = st.Monitor(model, run_dir=rd, config=watchdog_config(stall=0.1, first=0.1))
    try:
        with mon.step(0):
            model(torch.randn(2, 8)).sum().backward()
    except Exception as exc:  # pragma: no cover - a platform without a working dynamo
        pytest.skip(f"torch.compile failed here: {exc}")
    mon.close()

    evs = events(rd)
    assert evs, "the compile was not noticed"
    opened = evs[0]
    assert (opened["event"], opened["severity"], opened["target"]) == ("open", "info", "inner")
    assert opened["data"]["classification"] == "compiling" and opened["data"]["first_call"]
    assert "torch/_" in opened["data"]["frame"]  # the dynamo / AOT autograd frame that decided it
    assert evs[-1]["event"] == "close", "a compile stall closes once the call returns"
    assert "classification: compiling" in dumps(rd)[0].read_text()


class SlowDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 2:
            time.sleep(0.8)  # a slow disk or network read
        return torch.randn(4)


def test_slow_getitem_between_steps_is_data_loading(run_dir):
    model, rd = Net(), run_dir()
    mon = st.Monitor(model, run_dir=rd, config=watchdog_config(stall=0.25))
    loader = torch.utils.data.DataLoader(SlowDataset(), batch_size=1, num_workers=0)
    for step, batch in enumerate(loader):
        with mon.step(step):
            model(batch)
    mon.close()

    [opened, closed] = events(rd)
    assert opened["target"] == "<between steps>" and opened["step"] == 1 and opened["severity"] == "warning"
    assert opened["data"]["classification"] == "data loading"
    assert "torch/utils/data/" in opened["data"]["frame"]
    assert "__getitem__" in opened["data"]["innermost_frame"]
    assert closed["event"] == "close"
    assert "between steps" in dumps(rd)[0].read_text()


def watchdog_threads() -> set[threading.Thread]:
    """The watchdog threads alive now (found by their name, not through the monitor's internals)."""
    return {t for t in threading.enumerate() if t.name == "stethoscope-watchdog"}


def test_no_stall_no_dump_no_finding(run_dir):
    model, rd = Net(), run_dir()
    before = watchdog_threads()
    mon = st.Monitor(model, run_dir=rd, config=watchdog_config(stall=0.3))
    [dog] = watchdog_threads() - before  # this monitor's own watchdog thread
    for step in range(5):
        with mon.step(step):
            model(torch.randn(2, 4)).sum().backward()
    with mon.pause():  # evaluation, checkpointing: never a stall
        model.block[1].delay = 0.7
        model(torch.randn(2, 4))
    assert dog.is_alive()
    mon.close()
    assert not dumps(rd) and not events(rd)
    assert not dog.is_alive()  # close() stopped and joined it
    assert not watchdog_threads() - before


def test_repeats_while_stuck(run_dir):
    model, rd = Net(), run_dir()
    mon = st.Monitor(model, run_dir=rd, config=watchdog_config(stall=0.2, repeat=0.3))
    model.block[1].delay = 1.1
    with mon.step(0):
        model(torch.randn(2, 4))
    mon.close()
    assert len(dumps(rd)) >= 2  # at ~0.2 s, ~0.5 s, ~0.8 s (>= 2 on a loaded machine)
    kinds = [e["event"] for e in events(rd)]
    assert kinds[0] == "open" and "update" in kinds and kinds[-1] == "close"


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_dumps_on_demand_and_handler_is_restored(run_dir):
    model, rd = Net(), run_dir()
    mon = st.Monitor(model, run_dir=rd, config=watchdog_config())
    with mon.step(0):
        model(torch.randn(2, 4))
    os.kill(os.getpid(), signal.SIGUSR1)
    for _ in range(100):  # the handler runs in this thread at the next bytecode boundary
        if dumps(rd):
            break
        time.sleep(0.01)
    [dump] = dumps(rd)
    text = dump.read_text()
    assert "SIGUSR1 (on demand)" in text and "test_sigusr1_dumps_on_demand" in text
    mon.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert not events(rd)  # a dump on demand is not a finding


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1 to interrupt the sleep")
def test_on_stall_raise_interrupts_with_hang_error(run_dir):
    model, rd = Net(), run_dir()
    mon = st.Monitor(model, run_dir=rd, config=watchdog_config(stall=0.2, on_stall="raise"))
    model.block[1].delay = 5.0
    start = time.monotonic()
    with pytest.raises(HangError) as info, mon.step(0):
        model(torch.randn(2, 4))
    assert time.monotonic() - start < 3.0  # the sleep was interrupted, not waited out
    assert info.value.dump is not None and info.value.dump.exists()
    assert "block.1" in str(info.value)
    mon.close()
    assert json.loads((rd / "meta.json").read_text())["status"] == "crashed"


def test_on_stall_exit_ends_the_process_after_the_dump(tmp_path):
    script = textwrap.dedent(f"""
        import time, torch
        from torch import nn
        import stethoscope as st
        model = nn.Sequential(nn.Linear(2, 2))
        watchdog = {{"stall_seconds": 0.2, "first_call_stall_seconds": 0.2, "on_stall": "exit"}}
        mon = st.Monitor(model, run_dir={str(tmp_path / "run")!r},
                         config={{"watchdog": watchdog, "console": {{"quiet": True}}}})
        with mon.step(0):
            time.sleep(10)
        print("not reached")
    """)
    env = dict(os.environ, STETHOSCOPE_DISABLE="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 3, proc.stderr
    assert "not reached" not in proc.stdout
    rd = tmp_path / "run"
    assert dumps(rd)
    meta = json.loads((rd / "meta.json").read_text())
    assert meta["status"] == "crashed" and "HangError" in meta["error"]
    assert events(rd)[0]["target"] == "<step, outside any module>"


def test_disabled_watchdog_starts_no_thread(run_dir):
    before = watchdog_threads()
    mon = st.Monitor(Net(), run_dir=run_dir(), config=watchdog_config(enabled=False))
    assert not watchdog_threads() - before
    mon.close()


def test_profile_names_the_slowest_module(run_dir):
    model, rd = Net(), run_dir()
    model.block[1].delay = 0.05
    mon = st.Monitor(model, run_dir=rd, config=watchdog_config(), schedule=lambda s: True)
    for step in range(2):
        with mon.step(step):
            model(torch.randn(2, 4))
    mon.close()
    profile = json.loads((rd / "profile.json").read_text())
    assert profile["sampled_steps"] == 2
    top = profile["modules"][0]
    assert top["name"] == "block.1" and 40 < top["self_ms_per_step"] < 500
    by_name = {m["name"]: m for m in profile["modules"]}
    assert by_name[""]["total_ms_per_step"] >= top["self_ms_per_step"]  # inclusive time of the model
    assert by_name[""]["self_ms_per_step"] < top["self_ms_per_step"]
