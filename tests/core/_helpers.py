"""Small helpers shared by the core tests (a training loop, reading rows back)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import stethoscope as st


def batch(step: int, d_in: int = 8, d_out: int = 4, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic regression batch for ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def train(mon: st.Monitor, model: nn.Module, opt: torch.optim.Optimizer | None, steps, **log) -> list:
    """The DESIGN.md loop on the tiny MLP: forward, backward, step, zero_grad; logs the loss tensor."""
    losses = []
    for step in steps:
        x, y = batch(step)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach(), **log)
        losses.append(loss.detach())
    return losses


def rows(run_dir: Path, kind: str, step: int | None = None):
    """metrics rows of one kind (and step) as a DataFrame."""
    df = st.load_run(run_dir).metrics_of(kind)
    if step is not None and not df.empty:
        df = df[df["step"] == step].reset_index(drop=True)
    return df


def quiet_config(**sections) -> dict:
    """A config dict that samples every step (unless overridden)."""
    cfg = {"sampling": {"warmup_steps": 1000, "every": 1, "after_anomaly": 0},
           "report": {"plots": False}}  # the figures are tested in tests/report
    cfg.update(sections)
    return cfg
