"""Flex attention and FlashAttention-style kernels go through the blocked statistics (issue 18, item 3).

Each model runs twice with the same weights and input: once with the kernel under test (captured, statistics
from q, k and the kernel's own mask, tile by tile) and once with ``eager`` (the full probability matrix the
model multiplied V with). Every column must agree within test_blocked.py's tolerances.

Flex on CPU: transformers compiles ``flex_attention`` and ``create_block_mask`` with Inductor (35 s on this
machine); the fixture runs both uncompiled — the same operator, its reference implementation — so the tests
stay fast. FlashAttention is not installable here: the fake backend below is handed to transformers' own
``_flash_attention_forward`` (unpadding, ``cu_seqlens``, packed ``position_ids``, window), so everything but
the CUDA kernel is transformers' real code path.
"""

from __future__ import annotations

import math

import pytest
import torch

import stethoscope as st
from stethoscope.attention import capture as cap
from stethoscope.attention.blocked import blocked_statistics, max_logits
from stethoscope.attention.checks import COLUMNS, WIDTH, head_statistics
from stethoscope.attention.masks import BlockMaskTiles, VarlenTiles
from tests.attention.conftest import QUIET, llama_gqa, padded_batch
from tests.attention.test_blocked import assert_same

TILES = ((5, 3), (0, 0))


@pytest.fixture
def eager_flex(monkeypatch):
    """Flex attention and its block masks without torch.compile."""
    import transformers.integrations.flex_attention as fx
    import transformers.masking_utils as mu
    from torch.nn.attention import flex_attention as tf

    def flex(query, key, value, training=False, **kwargs):
        return tf.flex_attention(query, key, value, **kwargs)

    def block_mask(*args, _compile=False, **kwargs):
        return tf.create_block_mask(*args, _compile=False, **kwargs)

    monkeypatch.setattr(fx, "compile_friendly_flex_attention", flex)
    monkeypatch.setattr(mu, "create_block_mask", block_mask)


def _fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                 softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    """flash_attn_varlen_func on CPU: (total, nh, hs) tokens, sequences by cu_seqlens, SDPA per sequence."""
    out = torch.zeros_like(q)
    n_rep = q.shape[1] // k.shape[1]
    for s in range(cu_seqlens_q.numel() - 1):
        a, b = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        c, d = int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1])
        lq, lk = b - a, d - c
        i = torch.arange(lq)[:, None] + (lk - lq)  # bottom-right aligned diagonal
        j = torch.arange(lk)[None, :]
        keep = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            keep &= j <= i
        if window_size[0] >= 0:
            keep &= j >= i - window_size[0]
        if window_size[1] >= 0 and not causal:
            keep &= j <= i + window_size[1]
        qs = q[a:b].transpose(0, 1)  # (nh, Lq, hs)
        ks = k[c:d].transpose(0, 1).repeat_interleave(n_rep, 0)
        vs = v[c:d].transpose(0, 1).repeat_interleave(n_rep, 0)
        scores = qs @ ks.transpose(-1, -2) * (softmax_scale or qs.shape[-1] ** -0.5)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        out[a:b] = (probs @ vs).transpose(0, 1)
    return out


def _fake_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                deterministic=False):
    """flash_attn_func: (B, T, nh, hs), one sequence per item."""
    b, t = q.shape[:2]
    cu = torch.arange(b + 1, dtype=torch.int32) * t
    cu_k = torch.arange(b + 1, dtype=torch.int32) * k.shape[1]
    out = _fake_varlen(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
                       cu, cu_k, None, None, dropout_p, softmax_scale, causal, window_size, softcap)
    return out.view(b, t, *out.shape[1:])


@pytest.fixture
def fake_flash(monkeypatch):
    """transformers' flash path with the CPU kernels above as the flash_attn package."""
    import transformers.modeling_flash_attention_utils as fa

    def imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        return _fake_flash, _fake_varlen, None, fa._pad_input, fa._unpad_input

    monkeypatch.setattr(fa, "_lazy_imports", imports)
    monkeypatch.setattr(fa, "_loaded_implementation", None)


def _captured(model, implementation, **inputs):
    """The calls a capture sees while ``model`` runs on ``implementation`` (set on the config directly: the flash
    packages are not installed, transformers would refuse the name through its setter)."""
    for cfg in cap._configs(model):
        cfg._attn_implementation_internal = implementation
    calls = []
    capture = cap.HFCapture(model, {m: n for n, m in model.named_modules()})
    capture.listeners.append(calls.append)
    try:
        with torch.no_grad():
            out = model(**inputs).logits
    finally:
        capture.remove()
    assert capture.implementations == {implementation: "wrapped"}
    return calls, out


def _compare(kernel_calls, eager_calls, pad, ids):
    """Blocked statistics of the kernel's calls == full-matrix statistics of eager's; the largest relative error."""
    assert len(kernel_calls) == len(eager_calls) == 2
    worst = 0.0
    for kc, ec in zip(kernel_calls, eager_calls, strict=True):
        assert kc.mask_tiles is not None and kc.weights is None
        full = head_statistics(ec, None, pad, ids)  # (nh * WIDTH + TAIL,) from the (B, nh, T, T) matrix
        heads = kc.query.shape[1]
        for tiles in TILES:
            blocked = blocked_statistics(kc, pad, ids, *tiles)
            assert_same(blocked, full, heads, ec, pad)
            rel = ((blocked - full).abs() / full.abs().clamp_min(1.0)).nan_to_num(0.0).max()
            worst = max(worst, float(rel))
        # the kernel's mask, expanded by the full-matrix path, gives the same row too (logits as the extension
        # fills them for returned weights)
        expanded = head_statistics(kc, None, pad, ids)
        expanded[: heads * WIDTH].view(heads, WIDTH)[:, COLUMNS.index("max_logit")] = max_logits(kc, pad, 4, 4)
        assert_same(expanded, full, heads, ec, pad)
    return worst


def mistral_window(**kw):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, sliding_window=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    return MistralForCausalLM(cfg)


def _packed() -> tuple[dict, None]:
    """Three sequences (5, 4, 3 tokens) packed in one row, told apart by position_ids restarting at 0."""
    pos = torch.cat([torch.arange(n) for n in (5, 4, 3)])[None]  # (1, 12)
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "position_ids": pos, "use_cache": False}, None  # no cache: packing is read


@pytest.mark.parametrize("family", ["llama", "mistral", "llama-packed"])
def test_flex_blocked_statistics_equal_eager(family, eager_flex):
    """Llama (rotary, 4 query heads on 2 kv heads, causal BlockMask with padding, or packed sequences) and
    Mistral (sliding window of 4): the BlockMask's mask_mod, evaluated per tile, reproduces eager's 4-D mask."""
    model = (mistral_window if family == "mistral" else llama_gqa)(attn_implementation="eager").eval()
    if family == "llama-packed":
        inputs, pad = _packed()
    else:
        ids, mask = padded_batch()
        inputs, pad = {"input_ids": ids, "attention_mask": mask}, mask == 0
    ids = inputs["input_ids"]
    eager_calls, eager_out = _captured(model, "eager", **inputs)
    flex_calls, flex_out = _captured(model, "flex_attention", **inputs)
    assert isinstance(flex_calls[0].mask_tiles, BlockMaskTiles) and flex_calls[0].key.shape[1] == 2
    keep = ~pad if pad is not None else torch.ones(1, 12, dtype=torch.bool)
    torch.testing.assert_close(flex_out[keep], eager_out[keep], atol=1e-5, rtol=1e-5)
    assert _compare(flex_calls, eager_calls, pad, ids) < 2e-5


def test_flex_mask_mod_that_only_takes_scalars_is_vmapped():
    """A hand-written mask_mod with Python control flow on a scalar still gives the kernel's mask."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    def scalar_only(b, h, q, kv):
        if q.dim() != 0:
            raise RuntimeError("scalars only")
        return (q >= kv) & ((q - kv) % 3 != 2)

    bm = create_block_mask(scalar_only, B=2, H=None, Q_LEN=20, KV_LEN=20, device="cpu", BLOCK_SIZE=8,
                           _compile=False)
    want = create_mask(scalar_only, 2, 1, 20, 20, device="cpu")  # (2, 1, 20, 20)
    tiles = BlockMaskTiles(bm, torch.arange(2))
    got = torch.cat([torch.cat([tiles.tile(q0, min(20, q0 + 7), k0, min(20, k0 + 6), torch.device("cpu"))
                                for k0 in range(0, 20, 6)], -1) for q0 in range(0, 20, 7)], -2)
    assert torch.equal(got, want)
    assert torch.equal(tiles.select(torch.tensor([1])).tile(0, 20, 0, 20, torch.device("cpu")), want[1:])
    assert not want.all() and want.any()


def test_flex_block_sparsity_without_mask_mod_is_the_mask():
    """A BlockMask built from blocks only (mask_mod = noop): the listed blocks are what the kernel attends."""
    from torch.nn.attention.flex_attention import BlockMask

    num = torch.tensor([[[1, 2]]], dtype=torch.int32)  # (B, H, nQb): query block 0 sees 1 kv block, 1 sees 2
    idx = torch.tensor([[[[0, 0], [0, 1]]]], dtype=torch.int32)  # (B, H, nQb, max kv blocks)
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=4, seq_lengths=(8, 8))
    got = BlockMaskTiles(bm, torch.arange(3)).tile(0, 8, 0, 8, torch.device("cpu"))  # (3, 1, 8, 8)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[:4, :4] = True
    want[4:, :] = True
    assert got.shape == (3, 1, 8, 8) and torch.equal(got[2, 0], want)


@pytest.mark.parametrize("case", ["padding", "packed-position-ids", "cu-seqlens", "window"])
def test_flash_blocked_statistics_equal_eager(case, fake_flash):
    """What a flash kernel receives — a 2-D padding mask, packed sequences by position_ids (batch of one) or by
    cu_seqlens, a sliding window — becomes the mask the blocked statistics apply; eager sees the same pattern
    as a 4-D mask (transformers detects packing from position_ids for eager too)."""
    model = (mistral_window if case == "window" else llama_gqa)(attn_implementation="eager").eval()
    if case in ("padding", "window"):
        ids, mask = padded_batch()
        inputs = {"input_ids": ids, "attention_mask": mask}
        pad = mask == 0
    else:
        inputs, pad = _packed()
        ids = inputs["input_ids"]
    eager_calls, eager_out = _captured(model, "eager", **inputs)
    if case == "cu-seqlens":
        cu = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
        inputs = {**inputs, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 5, "max_length_k": 5}
    flash_calls, flash_out = _captured(model, "flash_attention_2", **inputs)
    assert isinstance(flash_calls[0].mask_tiles, VarlenTiles) and flash_calls[0].mask is None
    keep = ~pad if pad is not None else torch.ones(1, 12, dtype=torch.bool)
    torch.testing.assert_close(flash_out[keep], eager_out[keep], atol=1e-5, rtol=1e-5)  # the fake is right
    assert _compare(flash_calls, eager_calls, pad, ids) < 2e-5


def test_varlen_mask_counts_real_tokens_for_the_window():
    """Padding inside a sequence: the kernel unpads first, so causality and the window count real tokens."""
    keep = torch.tensor([[1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    tiles = VarlenTiles.build(6, 6, torch.device("cpu"), causal=True, window=2, attention_mask=keep)
    got = tiles.tile(0, 6, 0, 6, torch.device("cpu"))[0, 0]
    assert got[4].tolist() == [False, True, False, False, True, False]  # its window: token 1, itself
    assert got[5].tolist() == [False, False, False, False, True, True]


def _train_monitored(model, run_dir, steps=2):
    ids, mask = padded_batch()
    mon = st.Monitor(model, run_dir=run_dir, config={**QUIET, "sampling": {"warmup_steps": steps}})
    for step in range(steps):
        with mon.step(step), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    ext = mon.extension("attention")
    methods, implementations = dict(ext.methods), dict(ext.implementations)
    mon.close()
    return st.load_run(run_dir), methods, implementations


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_monitor_captures_and_unobserved_does_not_list_attention(implementation, tmp_path, eager_flex, fake_flash):
    model = llama_gqa(attn_implementation="eager").eval()
    model.config._attn_implementation_internal = implementation
    original = cap.original_function(model.model.layers[0].self_attn, implementation)
    run, methods, implementations = _train_monitored(model, tmp_path / "r")
    assert implementations == {implementation: "wrapped"}
    assert methods == {"model.layers.0.self_attn": "recompute", "model.layers.1.self_attn": "recompute"}
    assert model.config._attn_implementation == implementation  # the name never changed ...
    assert cap.original_function(model.model.layers[0].self_attn, implementation) is original  # ... entry restored
    attn = run.metrics_of("attn")  # 2 sampled steps x 2 layers x 4 heads
    assert len(attn) == 16 and (attn["padding_mass"] == 0).all() and (attn["causal_leak"] == 0).all()
    assert attn["max_logit"].map(math.isfinite).all() and (attn["rows"] == 38).all()
    unobserved = [f for f in run.findings if f.code == "monitor.unobserved"]
    assert all(not f.data.get("attention_not_captured") for f in unobserved)
    assert all("attention not captured" not in f.message for f in unobserved)


def test_paged_attention_is_still_said_not_captured():
    model = llama_gqa(attn_implementation="eager")
    model.config._attn_implementation_internal = "paged|eager"
    capture = cap.HFCapture(model, {m: n for n, m in model.named_modules()})
    try:
        assert capture.implementations["paged|eager"].startswith("not captured") and not capture.active
    finally:
        capture.remove()


def test_a_model_whose_attention_is_all_uncaptured_says_so(tmp_path):
    """With every layer on a paged kernel nothing is hooked, yet monitor.unobserved must still say attention
    was not captured (the extension stays, without hooks, to tell coverage)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = "paged|stethoscope-test"
    AttentionInterface.register(name, sdpa_attention_forward)
    try:
        model = llama_gqa(attn_implementation="eager")
        model.config._attn_implementation_internal = name
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        with st.Monitor(model, opt, run_dir=tmp_path / "run", config=QUIET) as mon:
            attention = mon.extension("attention")
            assert not attention.watching and list(attention.not_captured) == [name]
            for step in range(2):
                ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(step))
                with mon.step(step):
                    model(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad()
    finally:
        AttentionInterface._global_mapping.pop(name, None)
    unobserved = [f for f in st.load_run(tmp_path / "run").findings if f.code == "monitor.unobserved"]
    assert len(unobserved) == 1 and f"attention not captured: {name}" in unobserved[0].message
    assert not any(r == "attn" for r in st.load_run(tmp_path / "run").metrics["kind"])
