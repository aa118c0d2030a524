"""Trace mode: events in trace.jsonl, the folded tree, module times, and the Trace API on real HF models."""

from __future__ import annotations

import io
import json

import torch
from rich.console import Console
from torch import nn

import stethoscope as st


def render(renderable, width: int = 140) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def gpt2(n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=64, n_positions=16))


def test_events_are_balanced_with_shapes_and_times(tmp_path):
    model = gpt2()
    ids = torch.randint(0, 64, (2, 5))
    path = tmp_path / "t" / "trace.jsonl"
    with torch.no_grad(), st.Trace(model, path) as tr:
        model(input_ids=ids)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(events) == tr.events == 2 * len(tr.all_calls())
    assert [e["event"] for e in events[:2]] == ["enter", "enter"] and events[-1]["event"] == "exit"
    first = events[0]
    assert first["name"] == "" and first["class"] == "GPT2LMHeadModel" and first["depth"] == 0
    assert first["inputs"][0]["shape"] == [2, 5] and first["inputs"][0]["dtype"] == "int64"
    last = events[-1]
    assert last["name"] == "" and last["outputs"][0]["shape"] == [2, 5, 64] and last["ms"] > 0
    attn = next(e for e in events if e["event"] == "exit" and e["name"] == "transformer.h.1.attn")
    assert attn["depth"] == 3 and attn["outputs"][0]["device"] == "cpu"
    # hooks come off: a later forward adds nothing
    model(input_ids=ids)
    assert len(path.read_text().splitlines()) == len(events)


def test_repeated_calls_get_call_indices_and_stats():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with st.Trace(model, stats=True) as tr:
        model(torch.randn(3, 4))
    calls = [(c.name, c.call) for c in tr.all_calls()]
    assert calls == [("", 0), ("0", 0), ("1", 0), ("0", 1)]  # one module, two calls (named once)
    stats = tr.all_calls()[1].stats[0]
    assert stats["finite"] and stats["std"] > 0
    times = {r["name"]: r for r in tr.module_times()}
    assert times["0"]["calls"] == 2 and times["0"]["params"] == 20
    text = render(tr.tree())
    assert "0 #1" in text and "mean" in text


def test_tree_of_24_layers_is_folded_and_depth_limited():
    model = gpt2(n_layer=24)
    with torch.no_grad(), st.Trace(model) as tr:
        model(input_ids=torch.randint(0, 64, (1, 4)))
    text = render(tr.tree(depth=3, repeats=2))
    assert "transformer.h.0 " in text and "transformer.h.1 " in text and "transformer.h.23 " in text
    assert "… 21 more GPT2Block calls (transformer.h.2 … transformer.h.22)" in text
    assert "transformer.h.5 " not in text
    assert "nested calls below depth 3" in text and "transformer.h.0.attn" not in text
    assert len(text.splitlines()) < 40
    deep = render(tr.tree(depth=6, repeats=2))
    assert "transformer.h.0.attn.c_attn" in deep


def test_trace_survives_an_exception_and_removes_hooks():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(2, 2), Boom())
    tr = st.Trace(model)
    try:
        with tr:
            model(torch.randn(1, 2))
    except RuntimeError:
        pass
    assert [c.name for c in tr.all_calls()] == ["", "0", "1"]
    assert not model._forward_hooks and not model[0]._forward_pre_hooks


def test_monitor_profile_config_off(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    mon = st.Monitor(
        model,
        run_dir=tmp_path / "r",
        schedule=lambda s: True,
        config={"trace": {"profile": False}, "console": {"quiet": True}},
    )
    with mon.step(0):
        model(torch.randn(1, 2))
    mon.close()
    assert not (tmp_path / "r" / "profile.json").exists()
