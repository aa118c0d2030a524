"""Reentrant activation checkpointing with frozen embeddings: every checkpointed block silently gets no gradient.

The classic pitfall (issue 15): ``torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)`` passes
gradients only to inputs that require grad; with a frozen embedding the hidden state does not, so no block
learns. It must read as one finding naming every block, with the checkpointing fix — and the non-reentrant
twin must stay silent.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import stethoscope as st
from tests.rules._helpers import alarms, describe, every_step


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.out = nn.Linear(64, 32)

    def forward(self, x):
        return x + self.out(self.act(self.fc(self.ln(x))))


class Net(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.emb = nn.Embedding(128, 32)
        self.layers = nn.ModuleList([Block() for _ in range(4)])
        self.head = nn.Linear(32, 128)

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.layers:
            if self.mode == "no_grad":
                with torch.no_grad():
                    h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h)


def run(tmp_path, mode: str) -> st.Run:
    torch.manual_seed(0)
    model = Net(mode)
    model.emb.requires_grad_(False)  # a frozen base: the hidden state needs no gradient
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    mon = st.Monitor(model, opt, run_dir=tmp_path / mode, config=every_step())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "None of the inputs have requires_grad=True"
        for step in range(4):
            ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
            with mon.step(step):
                loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            mon.log(loss=loss.detach())
    mon.close()
    return st.load_run(tmp_path / mode)


def test_reentrant_checkpointing_is_one_finding_with_the_checkpointing_fix(tmp_path):
    r = run(tmp_path, "reentrant")
    loud = alarms(r)
    assert [f.code for f in loud] == ["grad.missing"], describe(r)
    [f] = loud
    block_params = {n for n, _ in Net("x").named_parameters() if n.startswith("layers.")}
    assert f.severity == "critical" and f.target == "layers.*" and set(f.members) == block_params
    assert f.message.startswith("24 parameters — every parameter under `layers.*` (blocks 0–3)")
    assert "reentrant activation checkpoint" in f.message
    assert "use_reentrant=False" in f.hint and "enable_input_require_grads" in f.hint
    assert r.incidents[0].root.id == f.id and r.verdict["cause"]["code"] == "grad.missing"


def test_non_reentrant_checkpointing_with_the_same_frozen_base_is_silent(tmp_path):
    r = run(tmp_path, "non_reentrant")
    assert not alarms(r), describe(r)


@pytest.mark.parametrize("mode", ["no_grad"])
def test_blocks_run_under_no_grad_are_named_with_their_own_fix(tmp_path, mode):
    r = run(tmp_path, mode)
    [f] = alarms(r)
    assert f.code == "grad.missing" and f.target == "layers.*"
    assert "ran its forward with autograd off" in f.message and "torch.no_grad()" in f.hint
    assert "use_reentrant" not in f.hint
