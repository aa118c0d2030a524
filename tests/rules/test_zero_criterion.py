"""Zero means dead (issue 15, item 5): a gradient entry counts as zero only where it is exactly zero.

Fresh transformers (GPT-2, Llama, BERT from tiny configs, no download) have query/key gradients orders of
magnitude below their value gradients at initialisation: the old |g| <= 1e-8 count read them as dead. Dead
ReLUs, a detached branch and a frozen path give exactly-zero gradients and are still caught; every road of
the statistics engine counts the same exact zeros.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import stethoscope as st
import stethoscope.stats as stats_mod
from stethoscope.collector import merge_stats
from stethoscope.stats import Scratch, tensor_stats
from tests.rules._helpers import alarms, describe, every_step, found, regression_batch, train
from tests.rules.test_grad_rules import ReluMLP

transformers = pytest.importorskip("transformers")


def targets(findings) -> set[str]:
    """The targets of findings, an aggregated finding (several targets in one) counting for each member."""
    return {t for f in findings for t in (getattr(f, "members", None) or [f.target])}


# ---------------------------------------------------------------------------------------------- the statistic
def _awkward(n: int = 5000) -> torch.Tensor:
    """Exact zeros (and -0.0), tiny but non-zero entries (1e-30, a float32 subnormal), NaN and ±Inf."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, generator=g) * 1e-3
    t[::7] = 0.0
    t[1::7] = -0.0
    t[2::11] = 1e-30
    t[3::13] = 1e-45  # subnormal in float32
    t[4::17] = -1e-12
    return t


def _count(t: torch.Tensor) -> tuple[int, int]:
    finite = torch.isfinite(t)
    return int((t[finite] == 0).sum()), int(finite.sum())


@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eps_zero_counts_exact_zeros_on_every_road_and_across_chunks(monkeypatch, nonfinite, dtype):
    t = _awkward().to(dtype)
    if nonfinite:
        t[5] = math.nan
        t[6] = math.inf
        t[4000] = -math.inf
    zeros, finite = _count(t.float())
    for road, host in (("host", True), ("device", False)):
        monkeypatch.setattr(stats_mod, "reads_host", lambda device, host=host: host)
        for size in (1 << 19, 1024):  # one chunk, and five
            row = tensor_stats(t, 0.0, 3.0, scratch=Scratch(size))
            st = merge_stats([(row.numpy(), t.numel())], 0, None)
            assert st.zero_fraction * finite == pytest.approx(zeros, abs=1e-6), (road, size)
            assert st.nonfinite == t.numel() - finite
    if dtype is torch.float16:
        return  # float16 has already rounded every tiny entry to an exact zero
    # eps 0 counts exact zeros only; the default eps also counts the tiny entries
    loose = merge_stats([(tensor_stats(t, 1e-8, 3.0).numpy(), t.numel())], 0, None)
    assert loose.zero_fraction * finite > zeros


@pytest.mark.slow
def test_the_compiled_kernel_counts_the_same_exact_zeros():
    from stethoscope.stats import CompiledStats

    t = _awkward()
    t[5], t[6] = math.nan, math.inf
    zeros, finite = _count(t)
    engine = CompiledStats()
    row = engine(t, 0.0, 3.0, False, None, None)
    assert not engine.broken
    st_ = merge_stats([(row.detach().numpy(), t.numel())], 0, None)
    assert st_.zero_fraction * finite == pytest.approx(zeros, abs=1e-6)


def test_a_monitored_gradient_row_counts_exact_zeros(tmp_path):
    """The grad rows of metrics.jsonl: exactly zero entries of .grad, not |g| <= stats.eps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight[:, :5] *= 1e-9  # units 0-4 alive, but their weight-gradient rows are ~1e-10
        model[0].bias[8:16] = -30.0  # units 8-15 dead: their rows are exactly zero
    run = train(model, tmp_path / "r", 1, opt=torch.optim.SGD(model.parameters(), lr=0.0))
    rows = run.metrics_of("grad").set_index("name")
    x, y = regression_batch(0, 8)  # the same batch and (lr 0) the same weights: the same gradients
    model.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    for name, p in model.named_parameters():
        exact = float((p.grad == 0).float().mean())
        assert rows.loc[name, "zero_fraction"] == pytest.approx(exact, abs=1e-7), name
    g = model[0].weight.grad
    assert float((g == 0).float().mean()) == pytest.approx(8 / 32)
    assert float((g.abs() <= 1e-8).float().mean()) == pytest.approx(13 / 32)  # what eps would have counted


# ---------------------------------------------------------------------------------------------- fresh transformers
def _train_lm(model: nn.Module, run_dir, vocab: int, steps: int = 4, batch: tuple[int, int] = (4, 32),
              loss_scale: float = 1.0):
    """A few AdamW steps on random tokens; returns the run and the first step's gradients."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mon = st.Monitor(model, opt, run_dir=run_dir, config=every_step())
    first = {}
    try:
        for step in range(steps):
            ids = torch.randint(0, vocab, batch, generator=torch.Generator().manual_seed(100 + step))
            with mon.step(step):
                out = model(input_ids=ids, labels=ids)
                (out.loss * loss_scale).backward()
                if step == 0:
                    first = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                             if p.grad is not None}
                opt.step()
                opt.zero_grad(set_to_none=True)
            mon.log(loss=out.loss.detach())
    finally:
        mon.close()
    return st.load_run(run_dir), first


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)


def _quiet(run) -> None:
    assert not found(run, "grad.zero_fraction"), describe(run)
    assert not found(run, "grad.dead_trend"), describe(run)
    assert not [f for f in alarms(run) if f.code.startswith("grad.") and f.code != "grad.missing"], describe(run)


@pytest.mark.parametrize("build", [_gpt2, _llama, _bert], ids=["gpt2", "llama", "bert"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_fresh_transformer_has_no_zero_gradient_finding(tmp_path, build, seed):
    torch.manual_seed(seed)
    run, _ = _train_lm(build(), tmp_path / "r", 512)
    _quiet(run)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_healthy_attention_gradients_at_initialisation_are_not_dead(tmp_path, seed):
    """A fresh GPT-2's query and key gradients are 20-50x below its value gradients, and every gradient shrinks
    with the tokens the loss averages over: at a realistic batch many q/k entries fall under 1e-8. Here the
    loss is scaled down instead (Adam does not care): the old |g| <= 1e-8 count puts over 5 % of
    c_attn.weight at zero — a warning on a healthy model — while no entry is exactly zero."""
    torch.manual_seed(seed)
    run, first = _train_lm(_gpt2(), tmp_path / "r", 512, batch=(16, 64), loss_scale=5e-3)
    _quiet(run)
    for i in range(2):
        g = first[f"transformer.h.{i}.attn.c_attn.weight"]
        assert float((g.abs() <= 1e-8).float().mean()) > 0.05  # what the old criterion counted
        assert float((g == 0).float().mean()) == 0.0


# ---------------------------------------------------------------------------------------------- still caught
@pytest.mark.parametrize("dead", [True, False], ids=["dead", "healthy-twin"])
def test_dead_relus_are_caught(tmp_path, dead):
    torch.manual_seed(0)
    model = ReluMLP()
    if dead:
        with torch.no_grad():
            model.fc1.bias[:24] = -30.0  # 24 of 64 units can never fire
    run = train(model, tmp_path / "r", 6)
    zf = found(run, "grad.zero_fraction", severity="critical")
    if dead:
        assert targets(zf) >= {"fc1.weight", "fc1.bias"}, describe(run)
        assert max(f.worst_value for f in zf) >= 24 / 64 - 1e-6
    else:
        assert not alarms(run), describe(run)


class Branches(nn.Module):
    """A trunk and a side branch added to it; ``mode`` cuts the branch off in different ways."""

    def __init__(self, mode: str = "healthy"):
        super().__init__()
        self.trunk = ReluMLP()
        self.side = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        # a frozen gate: requires_grad False, so nothing ever reopens the path behind it
        self.gate = nn.Parameter(torch.ones(()), requires_grad=False)
        self.mode = mode
        self.cut = False

    def forward(self, x):
        side = self.side(x)
        if self.cut and self.mode == "detached":
            side = side.detach()
        return self.trunk(x) + self.gate * side


def _train_branches(tmp_path, mode: str, set_to_none: bool, cut_from: int = 2, steps: int = 8):
    torch.manual_seed(0)
    model = Branches(mode)
    if mode == "frozen":
        with torch.no_grad():
            model.gate.zero_()  # the side path is frozen shut: its parameters get exactly zero gradient

    def before(step):
        model.cut = step >= cut_from

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = st.Monitor(model, opt, run_dir=tmp_path / mode, config=every_step())
    try:
        for step in range(steps):
            before(step)
            x, y = regression_batch(step, 16)
            with mon.step(step):
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=set_to_none)
            mon.log(loss=loss.detach())
    finally:
        mon.close()
    return st.load_run(tmp_path / mode)


def test_a_detached_branch_is_caught_as_zero_or_missing_gradients(tmp_path):
    # zero_grad(set_to_none=False): the branch keeps the zero tensors it was reset to: exactly zero, every entry
    zeroed = _train_branches(tmp_path / "zeros", "detached", set_to_none=False)
    zf = found(zeroed, "grad.zero_fraction", severity="critical")
    assert targets(zf) == {"side.0.weight", "side.0.bias", "side.2.weight", "side.2.bias"}, describe(zeroed)
    assert all(math.isclose(f.worst_value, 1.0) for f in zf)
    # set_to_none=True (the default): no gradient at all
    missing = _train_branches(tmp_path / "none", "detached", set_to_none=True)
    assert targets(found(missing, "grad.missing", severity="critical")) == {
        "side.0.weight", "side.0.bias", "side.2.weight", "side.2.bias"}, describe(missing)
    healthy = _train_branches(tmp_path / "healthy", "healthy", set_to_none=False)
    assert not alarms(healthy), describe(healthy)


def test_a_frozen_path_is_caught(tmp_path):
    """The branch requires grad, but a frozen zero gate in front of the loss stops every gradient to it."""
    run = _train_branches(tmp_path, "frozen", set_to_none=True)
    zf = found(run, "grad.zero_fraction", severity="critical")
    assert targets(zf) == {"side.0.weight", "side.0.bias", "side.2.weight", "side.2.bias"}, describe(run)
    assert not found(run, "grad.zero_fraction", "trunk.fc1.weight")


def test_exact_zeros_in_a_fused_qkv_bias_are_judged_on_the_rest(tmp_path):
    """The key part of a fused bias gets a rounding residue, not zeros: dead query/value units still count."""
    from stethoscope.findings import FindingLog
    from stethoscope.rules import grads
    from stethoscope.rules.base import RuleContext
    from stethoscope.rules.model_info import ModelInfo, ParamInfo
    from stethoscope.stats import Stats

    info = ModelInfo(params={"attn.in_proj_bias": ParamInfo("attn.in_proj_bias", "attn", "in_proj_bias", 96, 1,
                                                              key_bias_share=1 / 3)})

    class Sink:
        def write(self, row):
            pass

        def flush(self):
            pass

    rule = grads.GradZeroFraction(RuleContext(findings=FindingLog(Sink()), info=info))

    def excess(zf):
        norm = 0.0 if zf == 1.0 else 1.0  # every entry exactly zero: the norm is 0
        st = Stats(96, 0.0, 1.0, -1.0, 1.0, 1.0, norm, zf, 0.0, 0, math.nan, 0)
        return grads.excess_zero_fraction(rule, "attn.in_proj_bias", st)

    assert excess(0.0) == 0.0
    assert excess(16 / 96) == pytest.approx(0.25)  # a quarter of the 64 query/value entries dead
    assert excess(32 / 96) == pytest.approx(0.0)  # the key third exactly zero (nothing reaches the scores)
    assert excess(48 / 96) == pytest.approx(0.25)
    assert np.isclose(excess(1.0), 1.0)
