"""Helpers for the health-rule tests: run a monitored training loop and read its findings back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import stethoscope as st
from stethoscope.run import Finding


def every_step(**sections) -> dict:
    """A config that samples every step, prints nothing, and adds ``sections``."""
    cfg: dict = {
        "sampling": {"warmup_steps": 10_000, "every": 1, "after_anomaly": 0},
        "console": {"quiet": True},
    }
    for key, value in sections.items():
        cfg[key] = value
    return cfg


def regression_batch(step: int, d_in: int, d_out: int = 4, n: int = 32, scale: float = 1.0):
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(n, d_in, generator=g) * scale
    return x, torch.randn(n, d_out, generator=g)


def train(
    model: nn.Module,
    run_dir: Path,
    steps: int,
    *,
    opt: torch.optim.Optimizer | None = None,
    lr: float = 1e-2,
    config: dict | None = None,
    batch: Callable[[int], tuple] | None = None,
    before_step: Callable[[int], None] | None = None,
    loss_fn: Callable | None = None,
) -> st.Run:
    """Train ``model`` on a regression task under a monitor; return the run read back."""
    opt = opt if opt is not None else torch.optim.Adam(model.parameters(), lr=lr)
    d_in = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    mon = st.Monitor(model, opt, run_dir=run_dir, config=config or every_step())
    try:
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            x, y = batch(step) if batch is not None else regression_batch(step, d_in)
            with mon.step(step):
                out = model(x)
                loss = loss_fn(out, y) if loss_fn is not None else (out - y).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            mon.log(loss=loss.detach())
    finally:
        mon.close()
    return st.load_run(run_dir)


def found(run: st.Run, code: str, target: str | None = ..., severity: str | None = None) -> list[Finding]:
    """The findings of ``code`` (on ``target`` when given — an aggregated finding counts for each of its
    members — at ``severity`` or worse when given)."""
    rank = {"info": 0, "warning": 1, "critical": 2}
    out = []
    for f in run.findings:
        if f.code != code:
            continue
        if target is not ... and f.target != target and target not in f.members:
            continue
        if severity is not None and rank[f.severity] < rank[severity]:
            continue
        out.append(f)
    return out


def first_at(run: st.Run, code: str, target: str | None, severity: str) -> int | None:
    """The first step at which the finding (code, target) was at ``severity`` (from its events)."""
    steps = [
        e["step"]
        for e in run.events
        if e.get("code") == code
        and e.get("target") == target
        and e.get("severity") == severity
        and e.get("event") in ("open", "update")
    ]
    return min(steps) if steps else None


def alarms(run: st.Run) -> list[Finding]:
    """Warning and critical findings (what a healthy run must not have)."""
    return [f for f in run.findings if f.severity in ("warning", "critical")]


def describe(run: st.Run) -> str:
    return "\n".join(
        f"{f.severity} {f.code} {f.target} step {f.first_step} value {f.worst_value}: {f.message}"
        for f in run.findings
    )
