"""The hook manager (issue 2, item 3): hooks come off, no reference is kept, shared and repeated modules."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.stats import finalize, tensor_stats

from ._helpers import batch, quiet_config, rows, train


def assert_no_hooks(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    for name, module in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            assert not getattr(module, attr, {}), f"{attr} left on {name or '<model>'}"
    if opt is not None:
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
        assert "zero_grad" not in vars(opt)
        assert opt.zero_grad.__func__ is type(opt).zero_grad


def test_every_hook_removed_on_close(tiny_mlp, run_dir):
    opt = torch.optim.AdamW(tiny_mlp.parameters(), lr=1e-3)
    mon = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), config=quiet_config())
    assert all(m._forward_hooks and m._forward_pre_hooks for m in tiny_mlp.modules())
    assert opt._optimizer_step_pre_hooks and "zero_grad" in vars(opt)
    train(mon, tiny_mlp, opt, range(3))
    mon.close()
    assert_no_hooks(tiny_mlp, opt)
    mon.close()  # twice is fine
    assert_no_hooks(tiny_mlp, opt)


def test_hooks_removed_on_gpt2(tiny_gpt2, run_dir):
    opt = torch.optim.AdamW(tiny_gpt2.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with st.Monitor(tiny_gpt2, opt, run_dir=run_dir(), config=quiet_config()) as mon, mon.step(0):
        tiny_gpt2(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert_no_hooks(tiny_gpt2, opt)


def _crash_inside_step(path):
    """Train, then raise inside ``with mon.step`` under ``with mon``; return only weak references."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config())
    with pytest.raises(RuntimeError, match="boom"), mon:
        train(mon, model, opt, range(2))
        with mon.step(2):
            x, y = batch(2)
            (model(x) - y).pow(2).mean().backward()
            raise RuntimeError("boom")
    assert mon.closed
    assert_no_hooks(model, opt)
    return mon, weakref.ref(model), weakref.ref(opt)


def test_hooks_removed_and_status_crashed_when_the_loop_raises(run_dir):
    path = run_dir()
    mon, model_ref, opt_ref = _crash_inside_step(path)
    gc.collect()
    assert model_ref() is None, "the monitor kept a reference to the model"
    assert opt_ref() is None, "the monitor kept a reference to the optimizer"
    assert mon.closed  # the monitor is still alive
    run = st.load_run(path)
    assert run.status == "crashed"
    assert "boom" in run.meta.get("error", "")


def test_no_reference_to_model_or_optimizer_after_close(run_dir):
    def build_and_train():
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        mon = st.Monitor(model, opt, run_dir=run_dir(), config=quiet_config(), scaler=scaler)
        train(mon, model, opt, range(3))
        mon.close()
        return mon, model, opt

    mon, model, opt = build_and_train()
    refs = [weakref.ref(model), weakref.ref(opt)]
    del model, opt
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert mon.closed


def test_a_forgotten_monitor_does_not_keep_the_model_alive(run_dir):
    model = nn.Linear(3, 3)
    mon = st.Monitor(model, run_dir=run_dir(), config=quiet_config())
    with mon.step(0):
        model(torch.randn(2, 3)).sum().backward()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # hooks hold the monitor weakly and the monitor holds the model weakly
    mon_ref = weakref.ref(mon)
    del mon
    gc.collect()
    # nor does anything keep the monitor itself: not its watchdog thread, nor the recorder's logging capture
    assert mon_ref() is None


def test_a_forgotten_monitor_is_freed_and_gives_back_the_logging_levels(run_dir):
    import logging

    root = logging.getLogger()
    before = root.level
    model = nn.Linear(3, 3)
    mon = st.Monitor(model, run_dir=run_dir(), config=quiet_config())  # watchdog and recorder on
    with mon.step(0):
        model(torch.randn(2, 3)).sum().backward()
    mon_ref = weakref.ref(mon)
    del mon
    gc.collect()
    assert mon_ref() is None
    assert root.level == before  # the recorder lowered it to capture DEBUG records; __del__ restored it
    hooks = [h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks) if h]
    assert hooks == []


# ---------------------------------------------------------------- shared and repeated modules
class Repeat3(nn.Module):
    """``block`` called three times per forward, its outputs kept for the test."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(6, 5)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen = []
        total = 0.0
        for i in range(3):
            out = self.block(x * (i + 1))
            self.seen.append(out.detach().clone())
            total = total + out.pow(2).sum()
        return total


def _ref(t: torch.Tensor, features: bool = True) -> dict:
    row = tensor_stats(t, features=features)
    return finalize(row.numpy(), t.numel(), t.shape[-1] if features else 0).as_dict()


def _close(row, ref: dict) -> None:
    for key in ("count", "nonfinite", "features", "dead_features"):
        assert row[key] == ref[key], key
    for key in ("mean", "std", "min", "max", "absmax", "norm", "zero_fraction", "saturation_fraction"):
        assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


def test_module_called_three_times_is_one_row_with_calls_3(run_dir):
    model = Repeat3()
    path = run_dir()
    mon = st.Monitor(model, run_dir=path, config=quiet_config())
    with mon.step(0):
        x = torch.randn(4, 6)
        x[:, 2] = 0.0
        model(x).backward()
    mon.close()
    acts = rows(path, "act", 0)
    block = acts[acts["name"] == "block"]
    assert len(block) == 1
    row = block.iloc[0]
    assert row["calls"] == 3
    _close(row, _ref(torch.cat(model.seen)))
    inputs = rows(path, "input", 0)
    assert inputs[inputs["name"] == "block"].iloc[0]["calls"] == 3


def test_per_call_rows(run_dir):
    model = Repeat3()
    path = run_dir()
    mon = st.Monitor(model, run_dir=path, config=quiet_config(stats={"per_call": True}))
    with mon.step(0):
        model(torch.randn(4, 6)).backward()
    mon.close()
    acts = rows(path, "act", 0)
    block = acts[acts["name"] == "block"].sort_values("call")
    assert list(block["call"]) == [0, 1, 2]
    assert list(block["calls"]) == [1, 1, 1]
    for (_, row), seen in zip(block.iterrows(), model.seen, strict=True):
        _close(row, _ref(seen))


class SharedTwice(nn.Module):
    """One Linear used twice in forward, plus a dead feature in one use only."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        a = self.shared(x)
        b = self.shared(torch.relu(a))
        self.seen = [a.detach().clone(), b.detach().clone()]
        return b.sum()


def test_weight_sharing_one_module_used_twice(run_dir):
    model = SharedTwice()
    with torch.no_grad():
        model.shared.weight[0].zero_()
        model.shared.bias[0] = 0.0  # feature 0 is exactly zero in both calls -> dead
    path = run_dir()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config())
    with mon.step(0):
        model(torch.randn(3, 4)).backward()
        grad = model.shared.weight.grad.clone()
        opt.step()
    mon.close()
    row = rows(path, "act", 0).set_index("name").loc["shared"]
    assert row["calls"] == 2
    ref = _ref(torch.cat(model.seen))
    assert ref["dead_features"] == 1
    _close(row, ref)
    grads = rows(path, "grad", 0).set_index("name")
    assert list(grads.index) == ["shared.weight", "shared.bias"]  # one row per parameter, not per use
    assert grads.loc["shared.weight", "norm"] == pytest.approx(grad.norm().item(), rel=1e-5)


class _Gate(nn.Module):
    def forward(self, x, keep):
        return x * keep


class _GatedNet(nn.Module):
    """One gate module called once per ``(sign, keep)`` pair: its calls merge into one statistics row."""

    def __init__(self, calls: list[tuple[float, torch.Tensor]]):
        super().__init__()
        self.gate = _Gate()
        self.calls = calls

    def forward(self, x):
        return sum(self.gate(sign * x, keep) for sign, keep in self.calls)


def _gate_row(run_dir, calls, x):
    net = _GatedNet(calls)
    path = run_dir()
    mon = st.Monitor(net, run_dir=path, config=quiet_config())
    with mon.step(0):
        net(x)
    mon.close()
    return rows(path, "act", 0).set_index("name").loc["gate"]


def test_dead_feature_alive_in_one_call_is_not_dead(run_dir):
    k1 = torch.tensor([0.0, 1.0, 1.0, 0.0])
    k2 = torch.tensor([1.0, 1.0, 1.0, 0.0])
    gate = _gate_row(run_dir, [(1.0, k1), (1.0, k1), (1.0, k2)], torch.randn(5, 4) + 2.0)
    assert gate["calls"] == 3
    assert gate["dead_features"] == 1  # only feature 3; feature 0 lives in the third call
    assert gate["zero_fraction"] == pytest.approx((2 * 2 + 1) / 12)


def test_a_call_with_no_entry_near_zero_keeps_every_feature_alive(run_dir):
    # a chunk with no |x| <= eps skips the per-feature max (its smallest |x| stands for every feature): merged
    # with calls whose features are dead, every feature lives; without it, the dead ones stay dead
    k = torch.tensor([0.0, 1.0, 1.0, 0.0])
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).abs() + 0.5  # no entry near zero
    assert _gate_row(run_dir, [(1.0, k), (-1.0, k), (1.0, torch.full((4,), 3.0))], x)["dead_features"] == 0
    assert _gate_row(run_dir, [(1.0, k), (-1.0, k)], x)["dead_features"] == 2


def test_tied_embedding_and_lm_head(tiny_gpt2, run_dir):
    model = tiny_gpt2
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    path = run_dir()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config())
    with mon.step(0):
        model(input_ids=ids, labels=ids).loss.backward()
        wte_grad = model.transformer.wte.weight.grad.clone()
        opt.step()
        opt.zero_grad()
    mon.close()
    grads = rows(path, "grad", 0).set_index("name")
    assert "transformer.wte.weight" in grads.index and "lm_head.weight" not in grads.index
    assert grads.loc["transformer.wte.weight", "norm"] == pytest.approx(wte_grad.norm().item(), rel=1e-5)
    assert len(grads) == len(dict(model.named_parameters()))
    acts = rows(path, "act", 0)
    names = set(acts["name"])
    assert {"transformer.wte", "lm_head", "transformer.h.0.attn", ""} <= names
    # the same block object used by no other path: one call each
    assert set(acts[acts["name"] == "transformer.h.0.mlp"]["calls"]) == {1}
    run = st.load_run(path)
    assert [f for f in run.findings if f.code == "monitor.error"] == []
    assert math.isfinite(run.scalars().loc[0, "grad_norm"])


class Reuse(nn.Module):
    """Calls ``scale`` three times on different inputs, dropping each output before the next call, so
    the allocator hands the next output the same memory (same data_ptr, shape, stride and version)."""

    def __init__(self):
        super().__init__()
        self.scale = ScaleBy2()
        self.ptrs: list[int] = []

    def forward(self, x):
        total = 0.0
        self.ptrs = []
        for i in range(3):
            y = self.scale(x + float(i))
            self.ptrs.append(y.data_ptr())
            total = total + y.sum()
            del y
        return total


class ScaleBy2(nn.Module):
    def forward(self, x):
        return x * 2.0


def test_reused_memory_is_not_mistaken_for_the_same_tensor(run_dir):
    model = Reuse()
    path = run_dir()
    x = torch.randn(64, 512)  # large enough for the allocator to reuse the block
    mon = st.Monitor(model, run_dir=path, config=quiet_config())
    with torch.no_grad(), mon.step(0):
        model(x)
    mon.close()
    row = rows(path, "act", 0).set_index("name").loc["scale"]
    assert row["calls"] == 3
    _close(row, _ref(torch.cat([(x + i) * 2.0 for i in range(3)])))


def test_a_tensor_first_seen_as_a_linear_input_still_gets_dead_features_as_an_output(run_dir):
    class PassThrough(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            self.lin(x)  # x is measured as the Linear's input first (no per-feature pass)
            return x  # ... then as this module's output

    x = torch.randn(5, 4)
    x[:, 1] = 0.0
    path = run_dir()
    model = PassThrough()
    mon = st.Monitor(model, run_dir=path, config=quiet_config())
    with mon.step(0):
        model(x)
    mon.close()
    root = rows(path, "act", 0).set_index("name").loc[""]
    assert root["dead_features"] == 1 and root["features"] == 4
