"""Run directories for the report tests: a real tiny GPT-2 run, and synthetic ones written row by row.

The synthetic writer produces the kinds other capabilities will add (``memory``, ``attn``, ``timing``, hang and
crash dumps, attention pictures) so their sections are tested before those capabilities land.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import stethoscope as st
from stethoscope.report import write_report

META = {
    "schema_version": 1,
    "status": "finished",
    "started_at": "2026-11-21T03:00:00+00:00",
    "ended_at": "2026-11-21T03:05:30+00:00",
    "last_step": 0,
    "rank": None,
    "world_size": 1,
    "versions": {"stethoscope": "0.1.0", "torch": "2.13.0+cpu", "python": "3.11.7", "cuda": None},
    "model": {
        "class": "Synthetic",
        "parameters": 1000,
        "trainable_parameters": 1000,
        "modules": 3,
        "dtypes": ["float32"],
        "devices": ["cpu"],
    },
    "optimizer": {"class": "AdamW", "groups": [{"lr": 1e-3, "params": 2}]},
}


def event(
    code: str, severity: str, step: int | None, target: str, value=0.5, threshold=0.2, kind: str = "open"
) -> dict:
    return {
        "schema_version": 1,
        "id": f"{code}:{target}",
        "event": kind,
        "step": step,
        "code": code,
        "severity": severity,
        "target": target,
        "value": value,
        "threshold": threshold,
        "message": f"{code} on `{target}` is {value} (synthetic)",
        "hint": f"{code} hint: do the fix",
        "rank": None,
        "data": {},
    }


SYNTHETIC_FINDINGS = [
    event("grad.zero_fraction", "warning", 3, "transformer.h.1.mlp.c_fc.weight", 0.31, 0.2),
    event("grad.zero_fraction", "warning", 9, "transformer.h.1.mlp.c_fc.weight", kind="close"),
    event("numerics.nonfinite", "critical", 7, "transformer.h.0.attn", None, None),
]


def write_run(
    path: Path, rows: list[dict], findings: list[dict] = (), last_step: int | None = None, **meta
) -> Path:
    """A run directory from metric rows and finding events, as the monitor would have written it."""
    path.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows if r.get("step") is not None]
    record = META | {"last_step": last_step if last_step is not None else max(steps, default=0)} | meta
    (path / "meta.json").write_text(json.dumps(record))
    with open(path / "metrics.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({"schema_version": 1} | r) + "\n")
    with open(path / "findings.jsonl", "w") as fh:
        for ev in findings:
            fh.write(json.dumps(ev) + "\n")
    return path


def stat_row(step: int, kind: str, name: str, **cols) -> dict:
    base = {
        "count": 100,
        "mean": 0.0,
        "std": 1.0,
        "min": -1.0,
        "max": 1.0,
        "absmax": 1.0,
        "norm": 1.0,
        "zero_fraction": 0.0,
        "saturation_fraction": 0.0,
        "nonfinite": 0,
        "dead_features": None,
        "features": 0,
    }
    extra = {"output": "", "calls": 1} if kind == "act" else {"missing": False} if kind == "grad" else {}
    return {"step": step, "kind": kind, "name": name} | extra | base | cols


@pytest.fixture(scope="package")
def gpt2_run(tmp_path_factory) -> Path:
    """A tiny GPT-2 trained 12 steps with the monitor on, plus a synthetic warning and critical finding.

    Written once for the folder; tests copy it when they write into it.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = tmp_path_factory.mktemp("report") / "gpt2"
    data = torch.randint(0, 128, (12, 4, 16))
    try:
        with st.Monitor(model, opt, run_dir=path, config={"console": {"quiet": True}}) as mon:
            for step in range(12):
                with mon.step(step):
                    loss = model(input_ids=data[step], labels=data[step]).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                mon.log(loss=loss.detach())
    finally:
        torch.set_num_threads(threads)
    with open(path / "findings.jsonl", "a") as fh:
        for ev in SYNTHETIC_FINDINGS:
            fh.write(json.dumps(ev) + "\n")
    write_report(path)
    return path
