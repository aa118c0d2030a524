"""The built-in demo: TinyGPT, the bundled corpus, each pathology at the tensor level, and run_demo end to end.

The pathology tests check the *mechanism* (dead units, NaN from step k, a None grad, ...) directly on
tensors, independently of the rules that are meant to find them, so a rule test failing later points at
the rule and not at the demo.
"""

from __future__ import annotations

import json
import math
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console
from stethoscope.demo import PATHOLOGIES, ByteCorpus, GPTConfig, TinyGPT, TrainSettings, get_pathology
from stethoscope.demo.corpus import CORPUS_FILE, LICENSE_FILE, SOURCE_FILE, corpus_bytes, decode, encode
from stethoscope.demo.runner import build, lr_at, train_step
from stethoscope.errors import ConfigError, RunDirError

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
DATA = Path(__file__).resolve().parents[1] / "stethoscope" / "demo" / "data"


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a busy shared CPU two spinning threads are 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(batch_size: int = 4, seed: int = 0, block_size: int = 64):
    return next(ByteCorpus().batches(batch_size, block_size, seed=seed))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


# ---------------------------------------------------------------- model


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = TinyGPT(SMALL)
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 16, 256)
    # an untrained byte model predicts ~uniformly: loss ~ ln(256)
    assert abs(loss.item() - math.log(256)) < 0.5
    logits, loss = model(idx[:, :5])  # shorter than block_size is fine
    assert logits.shape == (3, 5, 256) and loss is None
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_names_follow_nanogpt_and_embedding_is_tied():
    model = TinyGPT()
    names = dict(model.named_modules())
    for name in ("transformer.wte", "transformer.h.3.attn.c_attn", "transformer.h.1.mlp.act", "lm_head"):
        assert name in names
    params = dict(model.named_parameters())
    assert "lm_head.weight" not in params  # listed once, as the embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    assert 0.7e6 < model.num_parameters() < 1.0e6


def test_attention_probabilities_are_causal_rows_summing_to_one():
    torch.manual_seed(0)
    model = TinyGPT(SMALL)
    idx = torch.randint(0, 256, (2, 16))
    maps = model.attention_maps(idx)
    assert len(maps) == SMALL.n_layer
    upper = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)
    for att in maps:
        assert att.shape == (2, SMALL.n_head, 16, 16)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, SMALL.n_head, 16))
        assert (att[..., upper] == 0).all()
        torch.testing.assert_close(att[..., 0, 0], torch.ones(2, SMALL.n_head))  # row 0 is one-hot
    # the flag is restored, nothing is kept around
    assert all(not b.attn.keep_attn and b.attn.last_attn is None for b in model.transformer.h)

    x = torch.randn(2, 16, SMALL.n_embd)
    attn = model.transformer.h[0].attn
    y, att = attn(x, return_attn=True)
    assert y.shape == x.shape and att.shape == (2, SMALL.n_head, 16, 16)
    attn.keep_attn = True
    attn(x)
    torch.testing.assert_close(attn.last_attn, att)


def test_no_information_flows_from_the_future():
    torch.manual_seed(0)
    model = TinyGPT(SMALL)
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation="tanh")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


# ---------------------------------------------------------------- corpus


def test_corpus_is_bundled_with_source_and_licence():
    data = corpus_bytes()
    assert len(data) >= 200_000
    assert data.decode("utf-8").startswith('The "assert" statement')
    assert (DATA / CORPUS_FILE).stat().st_size == len(data)
    source = " ".join((DATA / SOURCE_FILE).read_text(encoding="utf-8").split())
    assert "pydoc_data" in source and "Python Software Foundation License Version 2" in source
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (DATA / LICENSE_FILE).read_text(encoding="utf-8")


def test_batches_are_deterministic_shifted_windows():
    corpus = ByteCorpus()
    first = [next(corpus.batches(8, 64, seed=3)) for _ in range(2)]
    torch.testing.assert_close(first[0][0], first[1][0])
    a = corpus.batches(8, 64, seed=3)
    b = corpus.batches(8, 64, seed=3)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = xa, ya
    assert x.shape == y.shape == (8, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    x_other, _ = next(corpus.batches(8, 64, seed=4))
    assert not torch.equal(x_other, first[0][0])
    # the generator is private: the global RNG does not change the batches, nor do batches change it
    state = torch.get_rng_state()
    torch.manual_seed(123)
    again, _ = next(corpus.batches(8, 64, seed=3))
    assert torch.equal(again, first[0][0])
    torch.set_rng_state(state)


def test_encode_decode_round_trip():
    text = "for x in range(3): print(“x”)"
    assert decode(encode(text)) == text
    assert decode([0xE2, 0x80]) == "\ufffd"  # a cut multi-byte character does not raise


# ---------------------------------------------------------------- training recipe


def test_lr_schedule_warms_up_then_decays():
    s = TrainSettings()
    assert lr_at(0, 300, s) == pytest.approx(s.lr / s.warmup_steps)
    assert lr_at(s.warmup_steps - 1, 300, s) == pytest.approx(s.lr)
    assert lr_at(299, 300, s) == pytest.approx(s.min_lr, rel=0.01)


def test_training_is_deterministic_and_leaves_the_callers_rng_alone():
    def losses(seed: int) -> list[float]:
        model, opt, path = build("none", seed)
        batches = ByteCorpus().batches(4, 64, seed=seed)
        out = []
        for step in range(3):
            x, y = next(batches)
            loss, _ = train_step(model, opt, path, TrainSettings(), step, 3, x, y)
            out.append(loss.item())
        return out

    torch.manual_seed(7)
    state = torch.get_rng_state()
    assert losses(0) == losses(0)
    assert losses(0) != losses(1)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- pathologies


def test_every_pathology_is_registered_with_exact_targets():
    assert list(PATHOLOGIES) == ["none", "dead-relu", "exploding", "vanishing", "nan", "unused-param"]
    assert get_pathology("none").expected == {}
    model, _, _ = build("unused-param")
    modules = set(dict(model.named_modules()))
    params = set(dict(model.named_parameters()))
    for name, cls in PATHOLOGIES.items():
        if name == "none":
            continue
        for code, targets in cls.expected.items():
            assert code.count(".") == 1
            for target in targets:
                assert target == "" or target in modules or target in params, (name, target)
    with pytest.raises(ConfigError, match="did you mean 'dead-relu'"):
        get_pathology("dead_relu")


def test_dead_relu_kills_every_unit_of_the_named_layer():
    model, _, path = build("dead-relu")
    acts: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.transformer.h):
        block.mlp.act.register_forward_hook(lambda m, a, out, i=i: acts.__setitem__(i, out.detach()))
    x, y = _batch()
    _, loss = model(x, y)
    loss.backward()
    dead = {i: (a.reshape(-1, a.shape[-1]) == 0).all(0).float().mean().item() for i, a in acts.items()}
    assert dead[1] >= 0.9  # in fact 1.0
    assert all(dead[i] == 0.0 for i in (0, 2, 3))  # the other blocks keep GELU, nothing dead
    assert isinstance(model.transformer.h[1].mlp.act, torch.nn.ReLU)
    grads = _grads(model)
    for name in path.expected["grad.zero_fraction"]:
        assert torch.count_nonzero(grads[name]) == 0, name
    assert torch.count_nonzero(grads["transformer.h.1.mlp.c_proj.bias"]) > 0
    assert torch.count_nonzero(grads["transformer.h.2.mlp.c_fc.weight"]) > 0


def test_exploding_gradient_norm_grows_by_orders_of_magnitude():
    steps = 12
    model, opt, path = build("exploding")
    batches = ByteCorpus().batches(4, 64, seed=0)
    norms = []
    for step in range(steps):
        x, y = next(batches)
        _, norm = train_step(model, opt, path, TrainSettings(), step, steps, x, y)
        norms.append(norm.item())
    onset = path.onset(steps)
    assert onset == 6 and opt.param_groups[0]["lr"] == 10.0
    before = torch.tensor(norms[:onset]).median().item()
    after = max(norms[onset + 1 :])  # the update at the onset step is the first with lr 10
    assert after > 20 * before
    assert all(math.isfinite(n) for n in norms)  # it explodes, it does not turn into NaN


def test_vanishing_gradients_in_the_named_layer():
    model, _, path = build("vanishing")
    x, y = _batch()
    _, loss = model(x, y)
    loss.backward()
    grads = _grads(model)
    for name in path.expected["grad.vanishing"]:
        same_in_block_1 = name.replace("transformer.h.0.", "transformer.h.1.")
        assert grads[name].norm() < 1e-2 * grads[same_in_block_1].norm(), name
        # tiny, but not zero: most entries stay above the zero threshold
        assert (grads[name].abs() > 1e-8).float().mean() > 0.9, name


def test_nan_appears_in_the_named_module_from_step_k():
    steps = 8
    model, opt, path = build("nan")
    onset = path.onset(steps)
    seen: dict[str, torch.Tensor] = {}
    attn = model.transformer.h[2].attn
    attn.register_forward_hook(lambda m, args, out: seen.update(inp=args[0].detach(), out=out.detach()))
    batches = ByteCorpus().batches(4, 64, seed=0)
    for step in range(steps):
        x, y = next(batches)
        loss, norm = train_step(model, opt, path, TrainSettings(), step, steps, x, y)
        assert torch.isfinite(seen["inp"]).all()  # the module's input stays finite
        if step < onset:
            assert torch.isfinite(seen["out"]).all() and torch.isfinite(loss)
        else:
            assert torch.isnan(seen["out"]).all() and torch.isnan(loss) and not torch.isfinite(norm)
    # the non-finite steps were skipped, so the weights never went bad
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unused_param_gets_no_gradient():
    model, opt, path = build("unused-param")
    gate = dict(model.named_parameters())[path.target]
    assert gate.requires_grad
    assert any(gate is p for group in opt.param_groups for p in group["params"])
    x, y = _batch()
    _, loss = model(x, y)
    loss.backward()
    assert gate.grad is None
    assert all(g is not None for n, g in _grads(model).items() if n != path.target)


# ---------------------------------------------------------------- end to end


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_run_demo_writes_a_run_directory(tmp_path):
    from stethoscope.demo import run_demo

    out = tmp_path / "demo"
    run_dir = run_demo(steps=20, out=out, quiet=True)
    assert run_dir == out
    for name in ("meta.json", "metrics.jsonl", "findings.jsonl"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    assert meta["status"] == "finished"
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["value"] for r in metrics if r.get("kind") == "scalar" and r.get("name") == "loss"]
    assert len(losses) == 20 and losses[-1] < losses[0]
    # the healthy demo is silent
    loud = [
        e for e in _read_jsonl(run_dir / "findings.jsonl") if e.get("severity") in ("warning", "critical")
    ]
    assert loud == []
    with pytest.raises(RunDirError):
        run_demo(steps=1, out=out, quiet=True)


def test_run_demo_prints_where_the_run_is(tmp_path):
    from stethoscope.demo import run_demo

    buf = StringIO()
    set_console(Console(file=buf, width=200, force_terminal=False))
    try:
        run_dir = run_demo(steps=3, out=tmp_path / "printed", pathology="unused-param")
    finally:
        set_console(None)
    text = buf.getvalue()
    assert "pathology unused-param" in text and "transformer.h.3.mlp.gate" in text
    assert f"stethoscope report {run_dir}" in text and f"stethoscope findings {run_dir}" in text
