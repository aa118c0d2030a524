"""Gradient and update rows (issue 2, item 5), checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stethoscope as st

from ._helpers import batch, quiet_config, rows


class Net(nn.Module):
    """An embedding (absent tokens get zero-gradient rows), a Linear, and an unused parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 3)
        self.unused = nn.Parameter(torch.ones(2))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, ids, scale=None):
        h = self.emb(ids)
        if scale is not None:
            h = h * scale
        return self.lin(h)


def _loss(model, step, scale=None):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 5, (4, 3), generator=g)  # tokens 5..9 never appear
    return model(ids, scale).pow(2).mean()


def test_grad_rows_match_the_gradients(run_dir):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = run_dir()
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config())
    with mon.step(0):
        _loss(model, 0).backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    mon.close()
    grads = rows(path, "grad", 0).set_index("name")
    assert set(grads.index) == {"emb.weight", "lin.weight", "lin.bias", "unused"}  # not the frozen one
    assert bool(grads.loc["unused", "missing"]) is True
    assert math.isnan(grads.loc["unused"].get("norm", math.nan))
    for name, g in expected.items():
        row = grads.loc[name]
        assert bool(row["missing"]) is False
        assert row["norm"] == pytest.approx(g.norm().item(), rel=1e-5)
        assert row["count"] == g.numel()
        assert row["zero_fraction"] == pytest.approx((g.abs() <= 1e-8).float().mean().item())
        assert row["nonfinite"] == 0
        assert row["mean"] == pytest.approx(g.mean().item(), rel=1e-4, abs=1e-7)
        assert row["max"] == pytest.approx(g.max().item(), rel=1e-6)
    assert grads.loc["emb.weight", "zero_fraction"] >= 0.5  # rows of the absent tokens
    scal = st.load_run(path).scalars()
    total = math.sqrt(sum(g.norm().item() ** 2 for g in expected.values()))
    assert scal.loc[0, "grad_norm"] == pytest.approx(total, rel=1e-5)


def test_nonfinite_gradients_are_counted(run_dir):
    model = Net()
    path = run_dir()
    mon = st.Monitor(model, run_dir=path, config=quiet_config())
    scale = torch.ones(1, 1, 4)
    scale[..., 2] = math.inf
    with mon.step(0):
        _loss(model, 0, scale).backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        mon.after_backward()
    mon.close()
    grads = rows(path, "grad", 0).set_index("name")
    for name, g in expected.items():
        assert grads.loc[name, "nonfinite"] == (~torch.isfinite(g)).sum().item(), name
    assert grads.loc["lin.weight", "nonfinite"] > 0


def test_update_ratio_is_the_relative_weight_change(run_dir, tiny_mlp):
    opt = torch.optim.AdamW(tiny_mlp.parameters(), lr=1e-2, weight_decay=0.1)
    path = run_dir()
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config())
    expected = {}
    for step in range(3):
        x, y = batch(step)
        with mon.step(step):
            (tiny_mlp(x) - y).pow(2).mean().backward()
            before = {n: p.detach().clone() for n, p in tiny_mlp.named_parameters()}
            opt.step()
            opt.zero_grad()
        expected[step] = {
            n: ((p.detach() - before[n]).norm() / before[n].norm()).item()
            for n, p in tiny_mlp.named_parameters()
        }
        norms = {n: before[n].norm().item() for n in before}
    mon.close()
    up = rows(path, "update")
    assert set(up["step"]) == {0, 1, 2}
    for _, row in up.iterrows():
        assert row["ratio"] == pytest.approx(expected[row["step"]][row["name"]], rel=1e-4)
    last = up[up["step"] == 2].set_index("name")
    for name, wn in norms.items():
        assert last.loc[name, "weight_norm"] == pytest.approx(wn, rel=1e-6)
        assert last.loc[name, "update_norm"] == pytest.approx(expected[2][name] * wn, rel=1e-4)


def test_update_ratio_off_and_selected_by_pattern(run_dir, tiny_mlp):
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    path = run_dir()
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config(stats={"update_ratio": ""}))
    x, y = batch(0)
    with mon.step(0):
        (tiny_mlp(x) - y).pow(2).mean().backward()
        opt.step()
    mon.close()
    assert rows(path, "update").empty
    assert len(rows(path, "grad")) == 4  # gradients are still read

    path = run_dir()
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config(stats={"update_ratio": ["*.weight"]}))
    with mon.step(0):
        (tiny_mlp(x) - y).pow(2).mean().backward()
        opt.step()
    mon.close()
    assert sorted(rows(path, "update")["name"]) == ["0.weight", "2.weight"]


def test_after_backward_without_an_optimizer(run_dir, tiny_mlp):
    path = run_dir()
    mon = st.Monitor(tiny_mlp, run_dir=path, config=quiet_config())
    x, y = batch(0)
    with mon.step(0):
        (tiny_mlp(x) - y).pow(2).mean().backward()
        expected = {n: p.grad.norm().item() for n, p in tiny_mlp.named_parameters()}
        mon.after_backward()
        with torch.no_grad():  # a hand-written SGD step that clears the gradients
            for p in tiny_mlp.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    # and a step without after_backward: read at the end of the step
    x, y = batch(1)
    with mon.step(1):
        (tiny_mlp(x) - y).pow(2).mean().backward()
        expected1 = {n: p.grad.norm().item() for n, p in tiny_mlp.named_parameters()}
    mon.close()
    g = rows(path, "grad")
    assert not g["missing"].any()
    for step, exp in ((0, expected), (1, expected1)):
        sub = g[g["step"] == step].set_index("name")
        for name, norm in exp.items():
            assert sub.loc[name, "norm"] == pytest.approx(norm, rel=1e-5)
    assert rows(path, "update").empty  # no optimizer, no update rows


@pytest.mark.parametrize("where", ["top", "between_forward_and_backward", "end"])
def test_zero_grad_anywhere_in_the_step_reads_this_steps_gradients(run_dir, tiny_mlp, where):
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    path = run_dir()
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config())
    expected = {}
    for step in range(3):
        x, y = batch(step)
        with mon.step(step):
            if where == "top":
                opt.zero_grad()
            loss = (tiny_mlp(x) - y).pow(2).mean()
            if where == "between_forward_and_backward":
                opt.zero_grad()
            loss.backward()
            expected[step] = {n: p.grad.norm().item() for n, p in tiny_mlp.named_parameters()}
            opt.step()
            if where == "end":
                opt.zero_grad()
    mon.close()
    g = rows(path, "grad")
    assert not g["missing"].any(), "grads read before this step's backward"
    for _, row in g.iterrows():
        assert row["norm"] == pytest.approx(expected[row["step"]][row["name"]], rel=1e-5)


# ---------------------------------------------------------------- GradScaler
class TwoBranch(nn.Module):
    """Two independent branches, so one can get an inf gradient while the other stays finite."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x1, x2):
        return self.a(x1).pow(2).mean() + self.b(x2).pow(2).mean()


def _scaler_available() -> bool:
    try:
        return torch.amp.GradScaler("cpu", init_scale=1024).is_enabled()
    except Exception:
        return False


@pytest.mark.skipif(not _scaler_available(), reason="torch.amp.GradScaler('cpu') is not available here")
@pytest.mark.parametrize(
    ("pass_scaler", "read"),
    # reading before unscale_ (after_backward) needs the scaler handed to the monitor (documented)
    [(True, "optimizer"), (False, "optimizer"), (True, "after_backward")],
)
def test_grad_scaler_skipped_step_is_read_and_unscaled(run_dir, pass_scaler, read):
    model = TwoBranch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    path = run_dir()
    mon = st.Monitor(model, opt, run_dir=path, config=quiet_config(), scaler=scaler if pass_scaler else None)
    true_norms, stepped = {}, {}
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x1, x2 = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
        if step == 1:
            x1[0, 0] = math.inf  # branch a's gradients are non-finite: the scaler skips this step
        with mon.step(step):
            loss = model(x1, x2)
            params = dict(model.named_parameters())
            grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
            true_norms[step] = {n: gr.norm().item() for n, gr in zip(params, grads, strict=True)}
            scaler.scale(loss).backward()
            if read == "after_backward":
                mon.after_backward()
            before = model.b.weight.detach().clone()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            stepped[step] = not torch.equal(before, model.b.weight)
    mon.close()
    assert stepped == {0: True, 1: False, 2: True}
    g = rows(path, "grad")
    assert set(g["step"]) == {0, 1, 2}
    assert not g["missing"].any()
    for _, row in g.iterrows():
        true = true_norms[row["step"]][row["name"]]
        if row["name"].startswith("a.") and row["step"] == 1:
            assert row["nonfinite"] > 0
        else:
            assert row["nonfinite"] == 0
            assert row["norm"] == pytest.approx(true, rel=1e-4), (row["step"], row["name"])


def test_gradient_norm_from_the_monitors_rows_at_the_optimizer_step(tmp_path):
    # incident capture needs the total gradient norm before every update; on a sampled CPU step the monitor
    # has just read every gradient at the same pre-hook, so the run context gives it from those rows: equal to
    # torch's own total norm, and None whenever the rows may not be what the optimizer applies
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.LayerNorm(3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []

    def probe(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((mon.context.gradient_norm(params),
                     float(torch.nn.utils.get_total_norm([p.grad for p in params])),
                     mon.context.gradient_norm(params[:-1])))

    mon = st.Monitor(net, opt, run_dir=tmp_path / "run", schedule=lambda s: s != 1)
    opt.register_step_pre_hook(probe)  # after the monitor's own pre-hook
    x = torch.randn(16, 6)
    for step in range(4):
        with mon.step(step):
            loss = net(x).pow(2).mean()
            loss.backward()
            if step == 2:  # read early, then clipped: the rows are not what the optimizer applies
                mon.after_backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
            opt.step()
            opt.zero_grad()
    mon.close()
    shared, torch_norm, subset = zip(*seen, strict=True)
    assert shared[0] == pytest.approx(torch_norm[0], rel=1e-6) and shared[3] == pytest.approx(torch_norm[3], rel=1e-6)
    assert shared[1] is None  # unsampled: the monitor read nothing
    assert shared[2] is None  # read before clipping
    assert subset[0] is None  # another set of parameters than the monitor read


def test_gradient_norm_from_rows_skips_an_empty_gradient(tmp_path):
    # a zero-size parameter's row holds NaN statistics, not a non-finite entry: the shared norm ignores it
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net.register_parameter("empty", nn.Parameter(torch.zeros(0, 3)))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    seen = []

    def probe(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((mon.context.gradient_norm(params), float(torch.nn.utils.get_total_norm([p.grad for p in params]))))

    mon = st.Monitor(net, opt, run_dir=tmp_path / "run", schedule=lambda s: True, config=quiet_config())
    opt.register_step_pre_hook(probe)
    with mon.step(0):
        (net(torch.randn(5, 4, generator=torch.Generator().manual_seed(0))).sum() + net.empty.sum()).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    assert seen[0][0] == pytest.approx(seen[0][1], rel=1e-6)
