"""Say what was not seen (issue 15, item 7): ``monitor.unobserved`` on a compiled model, silent otherwise."""

from __future__ import annotations

import torch
from torch import nn

import stethoscope as st

from ._helpers import quiet_config


def _train(model, opt, path, steps=6, config=None, forward=None):
    mon = st.Monitor(model, opt, run_dir=path, config=config or quiet_config())
    for step in range(steps):
        with mon.step(step):
            (forward or model)(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    mon.close()
    return st.load_run(path)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def test_a_compiled_model_says_what_was_not_seen(run_dir):
    model = _mlp()
    compiled = torch.compile(model, backend="eager")  # dynamo traces the forward; hooks stay out of the graph
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = _train(compiled, opt, run_dir())
    [f] = [f for f in run.findings if f.code == "monitor.unobserved"]
    assert f.severity == "info" and run.verdict["status"] == "healthy"
    assert sorted(f.data["unobserved"]) == ["0", "1", "2"] and f.data["compiled"] == [""]
    assert "torch.compile" in f.message and "without torch.compile" in f.hint


def test_the_same_model_uncompiled_is_fully_seen(run_dir):
    model = _mlp()
    run = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), run_dir())
    assert not [f for f in run.findings if f.code == "monitor.unobserved"], run.findings


def test_too_few_sampled_steps_for_the_trend_checks_is_said(run_dir):
    model = _mlp()
    cfg = quiet_config(sampling={"warmup_steps": 2, "every": 1000})
    run = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), run_dir(), steps=3, config=cfg)
    [f] = [f for f in run.findings if f.code == "monitor.unobserved"]
    assert "only 2 sampled step(s)" in f.message and f.data["sampled_steps"] == 2


def test_an_unused_branch_is_not_reported(run_dir):
    """A module that never runs has nothing to observe: not a blind spot."""

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()
            self.spare = nn.Linear(8, 4)  # never called
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])  # a container is never called itself

        def forward(self, x):
            return self.blocks[0](self.body(x))

    model = WithSpare()
    run = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), run_dir())
    assert not [f for f in run.findings if f.code == "monitor.unobserved"]
