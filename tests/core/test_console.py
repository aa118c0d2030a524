"""What the monitor prints while training (issue 2, item 11), rendered to a fixed-width buffer."""

from __future__ import annotations

import io
import re

import torch
from rich.console import Console

import stethoscope as st
from stethoscope.console import get_console, set_console

from ._helpers import batch


def _train(model, path, steps, config):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = st.Monitor(model, opt, run_dir=path, config=config)
    losses = {}
    for step in steps:
        x, y = batch(step)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        mon.log(loss=loss.detach())
        losses[step] = loss.item()
    return mon, losses


def _step_lines(text):
    return [line for line in text.splitlines() if line.startswith("stethoscope · step")]


def test_a_sampled_step_prints_one_compact_line(tiny_mlp, run_dir):
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=100))
    path = run_dir()
    mon, losses = _train(tiny_mlp, path, range(4), {"sampling": {"warmup_steps": 1, "every": 2}})
    mon.close()
    lines = _step_lines(buffer.getvalue())
    assert [int(re.search(r"step (\d+)", line).group(1)) for line in lines] == [0, 2]  # sampled only
    grad_norm = st.load_run(path).scalars()["grad_norm"]
    for line in lines:
        step = int(re.search(r"step (\d+)", line).group(1))
        assert len(line) <= 100 and "\n" not in line
        loss = float(re.search(r"loss ([0-9.e+-]+)", line).group(1))
        assert loss == float(f"{losses[step]:.4g}")
        norm = float(re.search(r"grad-norm ([0-9.e+-]+)", line).group(1))
        assert norm == float(f"{grad_norm[step]:.3g}")
    assert "verdict" in buffer.getvalue()  # the summary at close


def test_quiet_prints_nothing(tiny_mlp, run_dir):
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=100))
    mon, _ = _train(tiny_mlp, run_dir(), range(4), {"console": {"quiet": True}})
    mon.findings.report("test.synthetic", "0", "critical", 1.0, 0.5, "m", "h", 3)
    mon.close()
    assert buffer.getvalue() == ""


def test_console_every_n_logged_steps(tiny_mlp, run_dir):
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=100))
    mon, _ = _train(
        tiny_mlp,
        run_dir(),
        range(6),
        {"sampling": {"warmup_steps": 0, "every": 100}, "console": {"every": 2}},
    )
    mon.close()
    steps = [int(re.search(r"step (\d+)", line).group(1)) for line in _step_lines(buffer.getvalue())]
    assert steps == [1, 3, 5]


def test_a_new_finding_is_printed_on_its_step(tiny_mlp, run_dir):
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=100))
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    mon = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), schedule=lambda step: False)
    x, _ = batch(0)
    with mon.step(0):
        tiny_mlp(x)
    mon.findings.report("test.synthetic", "2", "warning", 1.0, 0.5, "m", "h", 0)
    with mon.step(1):
        pass
    lines = _step_lines(buffer.getvalue())
    assert len(lines) == 1 and "warning test.synthetic" in lines[0] and lines[0].endswith(" 2")
    mon.close()


def test_set_console_none_resets_to_stdout():
    set_console(None)
    assert get_console() is get_console()


def test_the_step_line_stays_one_line_with_findings_on_a_narrow_console(tiny_mlp, run_dir):
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=60))  # a log file: rich would hard-wrap at its width
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    mon = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), schedule=lambda step: step == 0)
    x, y = batch(0)
    with mon.step(0):
        loss = (tiny_mlp(x) - y).pow(2).mean()
        loss.backward()
    mon.log(loss=loss)
    for target in ("0.weight", "0.bias", "2.weight", "2.bias"):
        mon.findings.report("test.synthetic", target, "warning", 1.0, 0.5, "m", "h", 0)
    with mon.step(1):
        pass
    text = buffer.getvalue()
    (line,) = _step_lines(text)
    assert "loss" in line and "grad-norm" in line and "+1 more" in line
    assert len(text.splitlines()) == 1
    mon.close()
