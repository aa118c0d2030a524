"""Routing health on tiny Mixtral and Qwen2-MoE models and a plain top-k gate: a router forced to collapse (a
biased gate) opens every routing finding, its healthy twin stays silent; the device row matches a naive count."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.moe.capture import find_routers, router_row, split_output
from tests.moe.conftest import QUIET

CODES = {"moe.load_imbalance", "moe.dead_expert", "moe.router_entropy", "moe.router_logits"}


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64))


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=64, decoder_sparse_step=1, mlp_only_layers=[]))


def bias_gates(model: nn.Module) -> None:
    """A biased gate: every token carries a constant feature (embedding column 0) and the gates of experts 0 and 1
    weigh it heavily — the bias a collapsed router has learnt, put there directly."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.05
        for r in find_routers(model):
            r.module.weight[:, 0] = 0.0
            r.module.weight[:2, 0] = 6.0


def train(model: nn.Module, run_dir, steps: int = 8) -> tuple[list[dict], list[dict]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = st.Monitor(model, opt, run_dir=run_dir, config=QUIET)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        with mon.step(step):
            ids = torch.randint(0, 128, (8, 16), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    mon.close()
    findings = [json.loads(x) for x in (run_dir / "findings.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [f for f in findings if f["event"] == "open"], [m for m in metrics if m.get("kind") == "moe"]


@pytest.mark.parametrize("build", [mixtral, qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_routers_are_found_once_per_layer(build):
    routers = find_routers(build())
    assert [(r.name, r.experts, r.top_k) for r in routers] == [
        ("model.layers.0.mlp.gate", 8, 2), ("model.layers.1.mlp.gate", 8, 2)]


@pytest.mark.parametrize("build", [mixtral, qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_collapsed_router_opens_every_routing_finding_and_its_healthy_twin_none(build, tmp_path):
    healthy, rows = train(build(), tmp_path / "healthy")
    assert not [f for f in healthy if f["code"] in CODES], healthy
    last = rows[-1]
    assert last["max_over_mean"] < 2.0 and last["dead"] == 0 and last["mean_entropy"] > 0.9

    model = build()
    bias_gates(model)
    opened, rows = train(model, tmp_path / "collapsed")
    by_code = {}
    for f in opened:
        by_code.setdefault(f["code"], set()).add(f["target"])
    layers = {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    assert {c: by_code.get(c) for c in CODES} == {c: layers for c in CODES}
    dead = next(f for f in opened if f["code"] == "moe.dead_expert")
    assert dead["severity"] == "critical" and dead["data"]["experts"] == [2, 3, 4, 5, 6, 7]
    imbalance = next(f for f in opened if f["code"] == "moe.load_imbalance")
    assert imbalance["value"] == pytest.approx(4.0)  # top-2 of 8 on two experts: E / k
    assert imbalance["data"]["overflow"] == pytest.approx(1 - 2 * 1.25 / 8)  # over capacity 1.25 × mean
    assert rows[-1]["load"][2:] == [0] * 6 and rows[-1]["load"][0] == 8 * 16


class TopKGate(nn.Module):
    """A plain top-k gate of one's own: a linear projection with a bias, softmax, top-k."""

    def __init__(self, d: int, experts: int, k: int):
        super().__init__()
        self.proj = nn.Linear(d, experts)
        self.num_experts, self.top_k = experts, k

    def forward(self, x):
        logits = self.proj(x)  # (B, T, E)
        weights, index = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        return logits, weights, index


class TinyMoE(nn.Module):
    def __init__(self, d: int = 16, experts: int = 4, k: int = 1):
        super().__init__()
        self.gate = TopKGate(d, experts, k)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        _, w, idx = self.gate(x)  # (B, T, k)
        y = sum(torch.where((idx == e).any(-1, keepdim=True), self.experts[e](x), 0.0) for e in range(len(self.experts)))
        return self.out(y * w.sum(-1, keepdim=True))


@pytest.mark.parametrize("collapse", [False, True])
def test_plain_top_k_gate(collapse, tmp_path):
    torch.manual_seed(0)
    model = TinyMoE()
    if collapse:
        with torch.no_grad():
            model.gate.proj.bias[:] = torch.tensor([20.0, 0.0, 0.0, 0.0])
    assert [(r.name, r.experts, r.top_k) for r in find_routers(model)] == [("gate", 4, 1)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = st.Monitor(model, opt, run_dir=tmp_path, config=QUIET)
    for step in range(6):
        with mon.step(step):
            model(torch.randn(8, 16, 16)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    mon.close()
    opened = {json.loads(x)["code"] for x in (tmp_path / "findings.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "open"}
    assert (opened & CODES) == (CODES if collapse else set())


def test_device_row_equals_a_naive_count():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 6) * 3  # (B, T, E)
    index = torch.topk(logits, 2, dim=-1).indices
    index[0, 0, 1] = -1  # a dropped slot counts nowhere
    row = router_row(logits, index, 2).tolist()
    E = 6
    flat = [int(i) for i in index.reshape(-1) if i >= 0]
    assert row[:E] == [flat.count(e) for e in range(E)]
    p = logits.reshape(-1, E).softmax(-1)
    assert row[E:2 * E] == pytest.approx(p.sum(0).tolist(), rel=1e-5)
    lse = torch.logsumexp(logits.reshape(-1, E), -1)
    n, ent, z2, z1, absmax = row[2 * E:]
    assert n == 35
    assert ent == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert z2 == pytest.approx(float((lse ** 2).sum()), rel=1e-5) and z1 == pytest.approx(float(lse.sum()), rel=1e-5)
    assert absmax == pytest.approx(float(logits.abs().max()))
    # no indices: the top-k is taken from the logits, as softmax-then-topk would
    assert router_row(logits, None, 2)[:E].sum() == 2 * 35
    # a router output tuple (logits, weights, indices) splits into its parts
    out = (logits.reshape(-1, E), torch.rand(35, 2), index.reshape(-1, 2))
    lg, ix = split_output(out, E)
    assert lg is out[0] and ix is out[2] and not math.isnan(row[-1])


def test_report_section_draws_the_expert_load_heatmap(tmp_path):
    from stethoscope.moe.report import moe

    model = mixtral()
    bias_gates(model)
    train(model, tmp_path, steps=3)
    section = moe(st.load_run(tmp_path))
    heat = next(p for p in section.plots if p.id == "moe-load")
    assert heat.data["rows"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert heat.data["matrix"][:, 0].tolist() == [4.0, 4.0] and heat.data["matrix"][:, 2:].max() == 0.0
    assert section.tables[0].rows[0][0].startswith("model.layers.")
    assert any(p.id == "logits-level" for p in section.plots)
