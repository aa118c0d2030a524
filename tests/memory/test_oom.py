"""memory.oom: a real torch.OutOfMemoryError raised from a module's forward inside a monitored step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.memory.oom import is_oom, requested_bytes
from stethoscope.recorder.dump import read_crash

from .conftest import quiet

_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
            "1.21 GiB is free.")


class Exploding(nn.Module):
    """A block that runs out of memory once the sequence is longer than ``limit`` (as attention would)."""

    def __init__(self, limit: int):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.limit:
            raise torch.OutOfMemoryError(_MESSAGE)
        return self.proj(x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = Exploding(limit=8)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.block(self.embed(input_ids)))


def _train(path, config=None):
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    raised = None
    mon = st.Monitor(model, opt, run_dir=path, config=config or quiet())
    try:
        for step in range(6):
            if step == 4:
                mon.epoch(1)  # the next epoch brings longer sequences
            seq = 6 if step < 4 else 32
            ids = torch.randint(0, 50, (4, seq))
            with mon.step(step):
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
                loss = out.logsumexp(-1).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
    except torch.OutOfMemoryError as exc:
        raised = exc
    mon.close()
    return raised, st.load_run(path)


def test_oom_writes_dump_and_finding_and_reraises_the_same_error(run_dir):
    path = run_dir()
    raised, run = _train(path)
    assert isinstance(raised, torch.OutOfMemoryError)
    assert str(raised) == _MESSAGE  # unchanged
    [f] = [f for f in run.findings if f.code == "memory.oom"]
    assert f.severity == "critical"
    assert f.first_step == 4
    assert f.target == "block"  # the innermost module whose forward was running
    assert f.value == 2048.0  # MiB the failed allocation asked for
    assert "1 step(s) after epoch 1 began" not in f.message  # it is the first step of the epoch
    assert "0 step(s) after epoch 1 began" in f.message
    d = f.data
    assert d["phase"] == "forward"
    assert {"path": "input_ids", "shape": [4, 32], "dtype": "int64"} in d["inputs"]
    assert d["after_epoch_boundary"] is True
    assert any("gradient checkpointing" in r for r in d["remedies"])
    assert any("bfloat16" in r for r in d["remedies"])
    assert any("sdpa" in r for r in d["remedies"])
    assert any("smaller batch" in r for r in d["remedies"])
    assert d["largest_tensors"] and d["largest_tensors"][0]["bytes"] > 0
    dump = path / d["dump"]
    text = dump.read_text(encoding="utf-8")
    assert text.startswith("stethoscope crash dump — out of memory in step 4")
    assert "input_ids (4, 32) int64" in text
    assert "256 now; the largest of the last 4 steps: 48" in text  # ids + mask, 4 x 6 tokens each before
    assert "larger than any recent batch" in text
    assert "epoch 1 began at step 4" in text
    assert "modules entered and not left in this step" in text and "    block" in text
    header, events = read_crash(dump.with_suffix(".jsonl"))
    assert header["exception"]["type"] == "OutOfMemoryError"
    assert header["data"]["oom"]["module"] == "block"
    assert any(e["message"].startswith("step 3 ends") for e in events)
    assert len(list(path.glob("crash-*.txt"))) == 1  # one dump per crash, not one per extension
    assert run.status == "crashed"


def test_oom_dump_without_the_recorder(run_dir):
    path = run_dir()
    raised, run = _train(path, quiet(recorder={"enabled": False}))
    assert isinstance(raised, torch.OutOfMemoryError)
    [f] = [f for f in run.findings if f.code == "memory.oom"]
    text = (path / f.data["dump"]).read_text(encoding="utf-8")
    assert "out of memory:" in text and "recorded events" not in text


def test_other_errors_are_not_oom(run_dir):
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("shape '[0, 4, -1]' is invalid for input of size 1280"))
    assert not is_oom(ValueError("out of memory"))  # only the error types the allocators raise
    assert requested_bytes(torch.OutOfMemoryError(_MESSAGE)) == 2 * 2**30
    model = nn.Linear(4, 4)
    path = run_dir()
    with pytest.raises(KeyError), st.Monitor(model, run_dir=path, config=quiet()) as mon, mon.step(0):
        raise KeyError("not memory")
    assert not [f for f in st.load_run(path).findings if f.code == "memory.oom"]
