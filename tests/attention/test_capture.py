"""Capture on real transformers families and the demo: healthy models stay silent, the step's numerics do not
change, and everything stethoscope switched is switched back."""

from __future__ import annotations

import pytest
import torch

import stethoscope as st
from stethoscope.attention import capture as cap
from stethoscope.demo.model import GPTConfig, TinyGPT

from .conftest import QUIET, attn_findings, bert, describe, gpt2, llama_gqa, padded_batch, train

DATA = torch.randint(1, 128, (3, 4, 12), generator=torch.Generator().manual_seed(0))


def lm_loss(model, step):
    return model(input_ids=DATA[step], labels=DATA[step]).loss


def bert_loss(model, step):
    ids, mask = padded_batch()
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return (h * mask[..., None]).pow(2).mean()


FAMILIES = {
    "gpt2": (gpt2, lm_loss, 2, 2, True),
    "llama-gqa": (llama_gqa, lm_loss, 2, 4, True),
    "bert-padded": (bert, bert_loss, 2, 2, False),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_healthy_transformers_are_silent_and_write_per_head_metrics(tmp_path, family):
    build, forward, layers, heads, causal = FAMILIES[family]
    run = train(build(), 2, forward, tmp_path / "r")
    assert not [f for f in run.findings if f.code.startswith("attn.")], describe(run.findings)
    attn = run.metrics_of("attn")
    assert len(attn) == 2 * layers * heads  # per step, module and head
    assert set(attn["method"]) == {"recompute"}  # SDPA returns no weights: recomputed from q, k and the mask
    assert set(attn["causal"]) == {causal}
    assert attn["row_sum_error"].max() < 1e-5 and attn["causal_leak"].max() == 0
    assert attn["padding_mass"].max() == 0
    assert attn["entropy"].notna().all() and attn["sink_share"].between(0, 1).all()
    if family == "bert-padded":  # padding query rows are left out: 12 + 9 + 5 + 12 valid rows per head
        assert set(attn["rows"]) == {38}


def test_demo_model_is_silent_and_read_from_its_own_weights(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 256, (2, 4, 17), generator=torch.Generator().manual_seed(0))

    def forward(m, step):
        return m(idx[step, :, :-1], targets=idx[step, :, 1:])[1]

    run = train(model, 2, forward, tmp_path / "r")
    assert not attn_findings(run, ("info", "warning", "critical")), describe(run.findings)
    attn = run.metrics_of("attn")
    assert set(attn["method"]) == {"module"} and set(attn["name"]) == {"transformer.h.0.attn",
                                                                        "transformer.h.1.attn"}
    assert set(attn["causal"]) == {True} and attn["causal_leak"].max() == 0
    assert all(not b.attn.keep_attn and b.attn.last_attn is None for b in model.transformer.h)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["auto", "recompute"])
def test_capture_changes_neither_loss_nor_gradients(tmp_path, family, mode):
    """Dropout on (training mode): the random stream must not be touched either."""
    build, forward, *_ = FAMILIES[family]
    results = []
    for monitored in (False, True):
        model = build()
        model.train()
        torch.manual_seed(123)
        mon = st.Monitor(model, run_dir=tmp_path / f"r{monitored}",
                         config={**QUIET, "attention": {"capture": mode}}) if monitored else None
        if mon is not None:
            with mon.step(0):
                loss = forward(model, 0)
                loss.backward()
            assert mon.extension("attention").methods  # it did capture
            mon.close()
        else:
            loss = forward(model, 0)
            loss.backward()
        results.append((loss.detach(), _grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_implementation_and_hooks_are_restored_after_close(tmp_path):
    model = gpt2()
    before = model.config._attn_implementation
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    mon = st.Monitor(model, run_dir=tmp_path / "r", config={**QUIET, "attention": {"capture": "eager"}})
    assert model.config._attn_implementation == "stethoscope_eager"
    ext = mon.extension("attention")
    assert ext.implementations == {before: f"wrapped (switched to eager from {before})"}
    with mon.step(0):
        model(input_ids=DATA[0], labels=DATA[0]).loss.backward()
    assert set(ext.methods.values()) == {"returned (re-run without dropout)"}  # dropout is on in train mode
    mon.close()
    assert model.config._attn_implementation == before
    assert not any(m in cap._WATCHED for m in model.modules())
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
    # the restored model computes exactly as a fresh one
    fresh = gpt2().eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=DATA[1]).logits, fresh(input_ids=DATA[1]).logits)


def test_eager_weights_in_eval_mode_are_read_as_returned(tmp_path):
    model = gpt2(attn_implementation="eager").eval()
    mon = st.Monitor(model, run_dir=tmp_path / "r", config=QUIET)
    with mon.step(0), torch.no_grad():
        model(input_ids=DATA[0])
    assert set(mon.extension("attention").methods.values()) == {"returned"}
    mon.close()
    run = st.load_run(tmp_path / "r")
    assert set(run.metrics_of("attn")["method"]) == {"returned"} and not attn_findings(run)


def test_capture_off_and_unsampled_steps_cost_nothing(tmp_path):
    model = gpt2()
    mon = st.Monitor(model, run_dir=tmp_path / "off", config={**QUIET, "attention": {"capture": "off"}})
    assert mon.extension("attention") is None and model.config._attn_implementation == "sdpa"
    mon.close()
    mon = st.Monitor(model, run_dir=tmp_path / "r", config={**QUIET, "sampling": {"warmup_steps": 0, "every": 5}})
    for step in (1, 2):  # not sampled
        with mon.step(step):
            model(input_ids=DATA[0])
    assert mon.extension("attention").methods == {}
    mon.close()
    assert st.load_run(tmp_path / "r").metrics_of("attn").empty


def test_model_inside_a_wrapper_is_named_as_the_wrapper_spells_it(tmp_path):
    from torch import nn

    enc = bert()
    model = nn.ModuleDict({"enc": enc, "head": nn.Linear(32, 2)})
    ids, mask = padded_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = st.Monitor(model, opt, run_dir=tmp_path / "r", config=QUIET)
    with mon.step(0):
        model["head"](enc(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]).sum().backward()
        opt.step()
    mon.close()
    names = set(st.load_run(tmp_path / "r").metrics_of("attn")["name"])
    assert names == {"enc.encoder.layer.0.attention.self", "enc.encoder.layer.1.attention.self"}
