"""attn.logit_growth: the rule on hand-built statistics, and induced on real text (Llama vs its QK-norm twin)."""

from __future__ import annotations

import pytest
import torch

from stethoscope.attention.rules import LogitGrowth, ModuleAttention
from tests.attention.conftest import describe


def module(values: list[float], name: str = "model.layers.0.self_attn") -> ModuleAttention:
    heads = [{"head": i, "rows": 10, "max_logit": v} for i, v in enumerate(values)]
    return ModuleAttention(name=name, heads=heads, causal=True, method="recompute")


def run_rule(series: list[list[float]], window: int = 8):
    """Feed per-step head values to a LogitGrowth inside a real monitor context; return the finding events."""
    import stethoscope as st

    net = torch.nn.Linear(2, 2)
    mon = st.Monitor(net, None, run_dir=None, config={"console": {"quiet": True}, "watchdog": {"enabled": False},
                                                      "trace": {"profile": False}})
    try:
        r = LogitGrowth(mon.context.rule_context, window=window, growth=2.0)
        events = []
        for step, values in enumerate(series):
            r.check_modules(step, [module(values)])
            events.append({f.code: f for f in mon.context.rule_context.findings.open.values()})
        return events
    finally:
        mon.close()


def test_growth_past_the_level_opens_naming_layer_and_heads():
    series = [[2.0 * 1.6**s, 3.0] for s in range(12)]  # head 0: 2 -> 350; head 1 steady
    events = run_rule(series)
    opened = [i for i, e in enumerate(events) if "attn.logit_growth" in e]
    assert opened, "a head growing 1.6x per step past 50 must open"
    f = events[opened[0]]["attn.logit_growth"]
    assert f.target == "model.layers.0.self_attn" and f.data["heads"] == [0] and f.severity == "warning"
    assert series[opened[0]][0] >= 50 and all(series[s][0] < 50 for s in range(opened[0]))
    assert "head 0" in f.message and "QK" in f.hint and "z-loss" in f.hint


def test_high_but_steady_heads_stay_silent_and_a_cleared_head_closes():
    steady = run_rule([[80.0, 75.0, 90.0]] * 12)  # sharp heads, not growing
    assert not any("attn.logit_growth" in e for e in steady)
    up_then_down = [[3.0 * 2**s] for s in range(8)] + [[10.0]] * 3  # 3 -> 384, then back to 10
    events = run_rule(up_then_down)
    assert "attn.logit_growth" in events[7] and "attn.logit_growth" not in events[-1]


def test_state_round_trip():
    r = LogitGrowth.__new__(LogitGrowth)
    r._history = {("a", 1): [1.0, 2.0]}
    again = LogitGrowth.__new__(LogitGrowth)
    again.load_state_dict(r.state_dict())
    assert again._history == r._history


def char_corpus() -> tuple[torch.Tensor, int]:
    from pathlib import Path

    path = Path("/work/shared/data/ud-english-ewt/en_ewt-ud-dev.conllu")
    if not path.exists():
        pytest.skip("UD English EWT is not on this machine")
    text = "\n".join(line[9:].strip() for line in path.read_text(encoding="utf-8").splitlines()
                     if line.startswith("# text = "))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), len(chars)


def induced(qk_norm: bool, tmp_path, steps: int = 40, lr: float = 3e-2):
    """A 2-layer, 4-head, 64-wide Llama (or Qwen3: the same with QK-norm) on EWT characters, AdamW at `lr`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tests.attention.conftest import train

    data, vocab = char_corpus()
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    net = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **kw)) if qk_norm else LlamaForCausalLM(LlamaConfig(**kw))
    g = torch.Generator().manual_seed(0)

    def forward(model, step):
        ix = torch.randint(0, len(data) - 65, (16,), generator=g)
        x = torch.stack([data[i : i + 64] for i in ix])  # (B, T) characters
        return model(input_ids=x, labels=x).loss

    return train(net, steps, forward, tmp_path / ("qk" if qk_norm else "plain"), lr=lr,
                 config={"sampling": {"warmup_steps": steps}})


def test_induced_on_real_text_opens_without_qk_norm_and_not_with_it(tmp_path):
    """The full run with the loss divergence is benchmarks/logit_growth.py; here its first 40 steps."""
    plain = induced(False, tmp_path)
    growth = [f for f in plain.findings if f.code == "attn.logit_growth"]
    assert growth, describe(plain.findings)
    first = min(growth, key=lambda f: f.first_step)
    assert first.target.startswith("model.layers.") and first.data["heads"]
    assert first.first_step < 30
    qk = induced(True, tmp_path)
    assert not [f for f in qk.findings if f.code == "attn.logit_growth"], describe(qk.findings)
    top_plain = plain.metrics_of("attn")["max_logit"].max()
    top_qk = qk.metrics_of("attn")["max_logit"].max()
    assert top_plain > 100 > 20 > top_qk, (top_plain, top_qk)
