"""Module outputs of every shape a model returns (issue 2, item 2): flattening and the monitor on them."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.flatten import first_float_tensor, iter_float_tensors

from ._helpers import quiet_config

Pair = namedtuple("Pair", ["hidden", "mask"])


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    ids: torch.Tensor
    extra: object = None


def flat(obj) -> list[tuple[str, torch.Tensor]]:
    return list(iter_float_tensors(obj))


def test_bare_tensor_and_scalars():
    t = torch.ones(2, 3)
    assert flat(t) == [("", t)]
    assert flat(None) == [] and flat(3) == [] and flat(2.5) == [] and flat("text") == [] and flat(True) == []
    assert flat(b"bytes") == []


def test_integer_and_bool_tensors_are_skipped_empty_and_zero_dim_are_kept():
    ints, bools = torch.arange(4), torch.ones(3, dtype=torch.bool)
    empty, scalar = torch.empty(0, 4), torch.tensor(1.5)
    got = flat((ints, bools, empty, scalar))
    assert [p for p, _ in got] == ["2", "3"]
    assert got[0][1] is empty and got[1][1] is scalar


def test_containers_paths_and_order():
    a, b, c, d = (torch.full((2,), float(i)) for i in range(4))
    obj = {"x": (a, [b, None, 7]), "y": OrderedDict(z=c), "w": Pair(d, torch.ones(2, dtype=torch.bool))}
    assert [(p, t) for p, t in flat(obj)] == [("x.0", a), ("x.1.0", b), ("y.z", c), ("w.0", d)]


def test_dataclass_and_namedtuple():
    logits = torch.randn(2, 5)
    got = flat(Out(logits, torch.arange(2), extra={"h": torch.zeros(1, dtype=torch.float16)}))
    assert [p for p, _ in got] == ["logits", "extra.h"]
    assert got[0][1] is logits
    assert [p for p, _ in flat(Pair(torch.ones(1), None))] == ["0"]


def test_hugging_face_model_output():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    logits, loss = torch.randn(1, 3, 8), torch.tensor(2.0)
    out = CausalLMOutputWithPast(
        loss=loss,
        logits=logits,
        past_key_values=None,
        hidden_states=(torch.randn(1, 3, 4), torch.randn(1, 3, 4)),
    )
    got = flat(out)
    assert [p for p, _ in got] == ["loss", "logits", "hidden_states.0", "hidden_states.1"]
    assert first_float_tensor(out) is loss


def test_cyclic_and_deeply_nested_structures_terminate():
    t = torch.ones(2)
    cyc: list = [t]
    cyc.append(cyc)
    d: dict = {"t": t}
    d["self"] = d
    assert [p for p, _ in flat(cyc)] == ["0"]
    assert [p for p, _ in flat(d)] == ["t"]
    deep: object = t
    for _ in range(50):
        deep = [deep]
    assert flat(deep) == []  # cut off, no RecursionError
    shared = (t, t)  # the same tensor twice is two paths, not a cycle
    assert [p for p, _ in flat(shared)] == ["0", "1"]


def test_first_float_tensor():
    assert first_float_tensor((torch.arange(3), None)) is None
    h = torch.randn(2)
    assert first_float_tensor((torch.arange(3), {"h": h})) is h


# ---------------------------------------------------------------- the monitor on each kind of output
class Emit(nn.Module):
    """A module returning ``make(x)``; a Linear in front keeps a gradient path."""

    def __init__(self, make):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.make = make

    def forward(self, x):
        return self.make(self.lin(x))


def _cyclic(h):
    out = [h]
    out.append(out)
    return out


OUTPUTS = {
    "tensor": lambda h: h,
    "tuple": lambda h: (h, h * 2),
    "list": lambda h: [h, None, 3],
    "dict": lambda h: {"a": h, "ids": torch.arange(3), "none": None},
    "dataclass": lambda h: Out(h, torch.arange(2)),
    "namedtuple": lambda h: Pair(h, h > 0),
    "none": lambda h: None,
    "int": lambda h: 7,
    "int_tensor": lambda h: torch.arange(4),
    "bool_tensor": lambda h: h > 0,
    "empty": lambda h: (h, torch.empty(0, 4)),
    "zero_dim": lambda h: (h, h.sum()),
    "nested": lambda h: {"a": [(h, {"b": (h * 3,)})], "c": "text"},
    "cyclic": _cyclic,
    "mixed_dtypes": lambda h: {"d": h.double(), "f": h, "h": h.half(), "bf": h.bfloat16()},
    "complex": lambda h: torch.complex(h, h),
}


def _hf_output(h):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=h.pow(2).mean(), logits=h)


OUTPUTS["causal_lm_output"] = _hf_output


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_monitor_runs_on_every_output_kind_without_errors(kind, run_dir):
    torch.manual_seed(0)
    model = Emit(OUTPUTS[kind])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = run_dir()
    with st.Monitor(model, opt, run_dir=path, config=quiet_config()) as mon:
        for step in range(2):
            with mon.step(step):
                model(torch.randn(3, 4))
                model.lin.weight.sum().backward()
                opt.step()
                opt.zero_grad()
    run = st.load_run(path)
    assert run.status == "finished"
    assert [f for f in run.findings if f.code == "monitor.error"] == []
    acts = run.metrics_of("act")
    expected = {p for p, _ in iter_float_tensors(OUTPUTS[kind](torch.ones(3, 4)))}
    got = set(acts[acts["name"] == ""]["output"]) if not acts.empty else set()
    assert got == expected
    assert set(acts[acts["name"] == "lin"]["output"]) == {""}


def test_float_inputs_matches_the_walk_of_args_and_kwargs():
    from stethoscope.flatten import float_inputs

    x, y = torch.randn(2, 3), torch.randn(4)
    ids = torch.tensor([1, 2])
    cases = [((x,), {}), ((ids,), {}), ((x, y), {}), ((x,), {"mask": y}), ((), {"h": x}), (([x, (y, ids)],), {}),
             ((torch.empty(2, device="meta"),), {})]
    for args, kwargs in cases:
        walked = [t for _, t in iter_float_tensors((args, kwargs))]
        got = float_inputs(args, kwargs)
        assert len(got) == len(walked) and all(a is b for a, b in zip(got, walked, strict=True)), (args, kwargs)
