"""numerics.nonfinite names the module where a NaN is born — never one that only inherits it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from torch import nn

import stethoscope as st
from tests.rules._helpers import describe, every_step, found, train


class Divide(nn.Module):
    """y = x / denom: a real division that goes non-finite when ``denom`` becomes 0."""

    def __init__(self):
        super().__init__()
        self.denom = 1.0

    def forward(self, x):
        return x / self.denom


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = Divide()
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


def test_module_that_emits_nan_from_step_k_is_named(tmp_path):
    model = Net()
    k = 3

    def arm(step: int) -> None:
        model.norm.denom = 0.0 if step >= k else 1.0  # 0/0 and x/0: NaN and Inf from step k on

    run = train(model, tmp_path / "r", 6, before_step=arm)
    nf = found(run, "numerics.nonfinite")
    assert [f.target for f in nf] == ["norm"], describe(run)
    assert nf[0].first_step == k and nf[0].severity == "critical"
    assert "division by zero" in nf[0].hint


def test_functional_op_inside_a_parent_is_the_parents(tmp_path):
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(16, 16)
            self.after = nn.Linear(16, 4)
            self.temperature = 1.0

        def forward(self, x):
            h = torch.softmax(self.inner(x) / self.temperature, -1)  # temperature 0: inf - inf = NaN
            return self.after(h)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Parent()

        def forward(self, x):
            return self.block(x)

    model = Outer()

    def arm(step: int) -> None:
        model.block.temperature = 0.0 if step >= 2 else 1.0

    run = train(model, tmp_path / "r", 4, before_step=arm)
    nf = found(run, "numerics.nonfinite")
    assert [f.target for f in nf] == ["block"], describe(run)  # not block.after, not the root
    assert nf[0].first_step == 2
    # the gradients inherit it, and their hint points back at the forward origin
    gn = found(run, "grad.nonfinite")
    assert gn and "`block`" in gn[0].hint
    assert gn[0].data["after"] == "numerics.nonfinite" and "A consequence: it opened while" in gn[0].message
    assert gn[0].caused_by == nf[0].id  # one incident: the forward origin and the gradients it poisoned


def test_finding_closes_when_the_forward_is_finite_again(tmp_path):
    model = Net()

    def arm(step: int) -> None:
        model.norm.denom = 0.0 if step == 1 else 1.0

    class SkipNonfinite(torch.optim.SGD):  # what a GradScaler does: no update from a non-finite gradient
        def step(self, closure=None):
            if all(
                torch.isfinite(p.grad).all()
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None
            ):
                super().step(closure)

    run = train(model, tmp_path / "r", 4, before_step=arm, opt=SkipNonfinite(model.parameters(), lr=0.01))
    nf = found(run, "numerics.nonfinite", "norm")
    assert nf and nf[0].cleared_step == 2, describe(run)


def test_loss_born_outside_the_model(tmp_path):
    model = Net()
    run = train(model, tmp_path / "r", 2, loss_fn=lambda out, y: (out - y).pow(2).mean() / 0.0 * 0.0)
    nf = found(run, "numerics.nonfinite")
    assert nf and nf[0].target is None and "outside the model" in nf[0].message, describe(run)


# ---------------------------------------------------------------------- property: the origin, every time
class Gate(nn.Module):
    """Passes its input through, or NaN once armed (a module that goes non-finite on its own)."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        return x * float("nan") if self.armed else x


class Node(nn.Module):
    """lin -> gate -> [functional poison] -> act (+ child): a tree of random depth."""

    def __init__(self, depth: int, d: int = 8):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.gate = Gate()
        self.act = nn.Tanh()
        self.child = Node(depth - 1, d) if depth > 1 else None
        self.poison = False  # a NaN born in a functional op inside this module's own forward

    def forward(self, x):
        h = self.gate(self.lin(x))
        if self.poison:
            h = h + torch.log(-torch.ones_like(h))  # log(-1) = NaN
        h = self.act(h)
        if self.child is not None:
            h = h + self.child(h)
        return h


class Tree(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.body = Node(depth)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(depth=hs.integers(1, 6), site=hs.integers(0, 1000), functional=hs.booleans(), k=hs.integers(0, 2))
def test_origin_found_for_random_depth_and_site(depth, site, functional, k):
    torch.manual_seed(depth)
    model = Tree(depth)
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, Node)]
    name, node = nodes[site % len(nodes)]
    if functional:
        expected, switch = name, (lambda on, node=node: setattr(node, "poison", on))
    else:
        expected, switch = f"{name}.gate", (lambda on, node=node: setattr(node.gate, "armed", on))
    with tempfile.TemporaryDirectory() as tmp:
        mon = st.Monitor(model, run_dir=Path(tmp) / "r", config=every_step())
        for step in range(k + 2):
            switch(step >= k)
            with mon.step(step):
                loss = model(torch.randn(4, 8)).pow(2).mean()
                loss.backward()
            mon.log(loss=loss.detach())
            model.zero_grad(set_to_none=True)
        mon.close()
        run = st.load_run(Path(tmp) / "r")
    nf = found(run, "numerics.nonfinite")
    assert [f.target for f in nf] == [expected], describe(run)
    assert nf[0].first_step == k
