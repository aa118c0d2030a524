"""Layer aliases, pooling, and resumable, memory-mapped extraction from any module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stethoscope.probe.errors import ProbeLayerError, ProbeModelError
from stethoscope.probe.features import (
    ModelInputs,
    ProbeAdapter,
    extract_features,
    hf_adapter,
    layer_aliases,
    load_factory,
    open_features,
    pool,
    resolve_layers,
)
from stethoscope.probe.manifest import ProbeItem


def test_aliases_of_hugging_face_layouts():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    bert = BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    )
    a = layer_aliases(bert)
    assert a["encoder_block_00"] == "encoder.layer.0" and a["block_02"] == "encoder.layer.2"
    gpt = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2))
    assert layer_aliases(gpt)["block_01"] == "h.1"
    assert list(resolve_layers(gpt, "all")) == ["block_00", "block_01"]


def test_aliases_of_a_tts_like_model(audio_adapter):
    net = audio_adapter().module
    assert layer_aliases(net)["decoder_block_01"] == "decoder.layers.1"
    layers = resolve_layers(net, ["decoder_block_02", "proj", "mid"], {"mid": "decoder.layers.1"})
    assert layers == {"decoder_block_02": "decoder.layers.2", "proj": "proj", "mid": "decoder.layers.1"}
    assert list(resolve_layers(net, "all", {"pre": "proj"})) == [
        "decoder_block_00",
        "decoder_block_01",
        "decoder_block_02",
        "pre",
    ]


def test_unknown_layers_say_what_exists(audio_adapter):
    net = audio_adapter().module
    with pytest.raises(ProbeLayerError, match=r"did you mean 'decoder_block_01'"):
        resolve_layers(net, ["decoder_blok_01"])
    with pytest.raises(
        ProbeLayerError, match=r"alias 'x' points at module 'decoder.layer.1'.*closest: decoder.layers.1"
    ):
        resolve_layers(net, "all", {"x": "decoder.layer.1"})
    with pytest.raises(ProbeLayerError, match="no repeated block list"):
        resolve_layers(torch.nn.Linear(2, 2), "all")


def test_pooling_against_a_naive_reference():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 5)
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    got = pool(h, mask, "mean_std")
    for b, n in enumerate(lengths):
        ref = torch.cat([h[b, :n].mean(0), h[b, :n].std(0, unbiased=False)])
        assert torch.allclose(got[b], ref, atol=1e-5)
    assert torch.allclose(pool(h, None, "mean"), h.mean(1), atol=1e-6)
    # (B, H, T) via time_axis, and a (B, H) output passes through
    assert torch.allclose(pool(h.transpose(1, 2), mask, "mean", time_axis=2), got[:, :5], atol=1e-6)
    flat = torch.randn(3, 5)
    assert torch.equal(pool(flat, mask, "mean"), flat)
    assert torch.equal(pool(flat, None, "mean_std"), flat)  # already pooled: no zero "std" columns


def test_input_mask_maps_proportionally_onto_strided_outputs():
    h = torch.arange(10.0).view(1, 10, 1).expand(2, 10, 1)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, :100] = True
    mask[1, :50] = True  # half the samples -> half the frames
    got = pool(h, mask, "mean")
    assert got[0, 0] == pytest.approx(4.5) and got[1, 0] == pytest.approx(2.0)  # mean of 0..4


def _items(n=10, seed=0, same_length=False):
    rng = np.random.default_rng(seed)
    sizes = [800 if same_length else 800 + 80 * i for i in range(n)]
    return [
        ProbeItem(index=i, id=f"u{i}", audio=rng.normal(size=s).astype(np.float32))
        for i, s in enumerate(sizes)
    ]


def test_extraction_writes_memory_mapped_arrays(tmp_path, audio_adapter):
    adapter = audio_adapter()
    layers = resolve_layers(adapter.module, "all")
    items = _items(same_length=True)  # no padding: a batch row equals the item run alone
    fs = extract_features(
        items,
        adapter,
        layers,
        tmp_path / "f",
        pooling="mean_std",
        batch_size=4,
        device="cpu",
        lengths=np.random.default_rng(1).permutation(10),  # batches in a shuffled order
        progress=False,
    )
    assert fs.complete and fs.layers == list(layers)
    arr = fs.array("decoder_block_01")
    assert isinstance(arr, np.memmap) and arr.shape == (10, 48) and arr.dtype == np.float32
    assert np.isfinite(arr).all()
    # rows follow item order even though batches were length-sorted: compare with a direct forward
    net = adapter.module
    with torch.inference_mode():
        one = adapter.preprocess([items[3]])
        cap = {}
        h = net.decoder.layers[1].register_forward_hook(lambda m, i, o: cap.setdefault("x", o))
        net(*one.args)
        h.remove()
    ref = pool(cap["x"], None, "mean_std")[0].numpy()
    np.testing.assert_allclose(arr[3], ref, atol=1e-4)
    assert not net.decoder.layers[1]._forward_hooks  # hooks came off


def test_interrupted_extraction_resumes_where_it_stopped(tmp_path, audio_adapter):
    items = _items(12)
    lengths = np.array([len(it.audio) for it in items])
    fresh = extract_features(
        items,
        audio_adapter(),
        {"decoder_block_02": "decoder.layers.2"},
        tmp_path / "ref",
        batch_size=4,
        device="cpu",
        lengths=lengths,
        progress=False,
    )
    adapter = audio_adapter()
    layers = {"decoder_block_02": "decoder.layers.2"}
    real = adapter.preprocess
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed ^C during the third batch
        return real(batch)

    adapter.preprocess = flaky
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            items,
            adapter,
            layers,
            tmp_path / "f",
            batch_size=4,
            device="cpu",
            lengths=lengths,
            progress=False,
        )
    done = np.load(tmp_path / "f" / "done.npy")
    assert done.sum() == 8 and not json.loads((tmp_path / "f" / "meta.json").read_text())["complete"]
    adapter.preprocess = real
    before = adapter.module.calls
    fs = extract_features(
        items, adapter, layers, tmp_path / "f", batch_size=4, device="cpu", lengths=lengths, progress=False
    )
    assert adapter.module.calls - before == 1  # only the missing batch ran
    assert fs.complete
    np.testing.assert_allclose(fs.array("decoder_block_02"), fresh.array("decoder_block_02"), atol=1e-5)
    # a finished extraction is not redone; other settings start over
    extract_features(items, adapter, layers, tmp_path / "f", batch_size=4, device="cpu", progress=False)
    assert adapter.module.calls - before == 1
    fs2 = extract_features(
        items, adapter, layers, tmp_path / "f", pooling="mean_std", batch_size=4, device="cpu", progress=False
    )
    assert fs2.array("decoder_block_02").shape[1] == 48 and adapter.module.calls - before == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_stays_close(tmp_path, audio_adapter, dtype):
    items = _items(6)
    layers = {"b": "decoder.layers.1"}
    ref = extract_features(items, audio_adapter(), layers, tmp_path / "32", device="cpu", progress=False)
    low = extract_features(
        items, audio_adapter(), layers, tmp_path / dtype, dtype=dtype, device="cpu", progress=False
    )
    a, b = ref.array("b"), low.array("b")
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_layers_off_the_forward_path_and_bad_outputs(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(3, 3)
            self.unused = torch.nn.Linear(3, 3)
            self.ints = torch.nn.Identity()

        def forward(self, x):
            self.ints(x.long())
            return self.used(x)

    items = [ProbeItem(index=i, id=str(i)) for i in range(4)]
    adapter = ProbeAdapter(Net(), lambda batch: torch.randn(len(batch), 5, 3))
    with pytest.raises(ProbeModelError, match="never ran"):
        extract_features(items, adapter, {"unused": "unused"}, tmp_path / "a", device="cpu", progress=False)
    with pytest.raises(ProbeModelError, match=r"holds no floating tensor.*Tensor\(4, 5, 3\) int64"):
        extract_features(items, adapter, {"ints": "ints"}, tmp_path / "b", device="cpu", progress=False)
    bad = ProbeAdapter(Net(), lambda batch: "not inputs")
    with pytest.raises(ProbeModelError, match="preprocess returned str"):
        extract_features(items, bad, {"used": "used"}, tmp_path / "c", device="cpu", progress=False)


def test_outputs_in_dicts_and_tuples(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(3, 4)

        def forward(self, x, scale=1.0):
            return {"last_hidden_state": self.inner(x) * scale, "extra": (1, 2)}

    items = [ProbeItem(index=i, id=str(i)) for i in range(3)]
    adapter = ProbeAdapter(
        Net(), lambda b: ModelInputs(args=(torch.ones(len(b), 2, 3),), kwargs={"scale": 2.0})
    )
    fs = extract_features(
        items,
        adapter,
        {"inner": "inner"},
        tmp_path / "d",
        device="cpu",
        progress=False,
    )
    assert fs.array("inner").shape == (3, 4)


def test_factory_loading(factory_module, tmp_path):
    adapter = load_factory(f"{factory_module}:make", {"dim": 6})
    assert isinstance(adapter, ProbeAdapter)
    assert list(resolve_layers(adapter.module, "all")) == ["block_00", "block_01"]
    with pytest.raises(ProbeModelError, match="returned int"):
        load_factory(f"{factory_module}:not_an_adapter")
    with pytest.raises(ProbeModelError, match="cannot import factory"):
        load_factory("no_such_module_xyz:make")
    with pytest.raises(ProbeModelError, match="must look like"):
        load_factory("just_a_name")


def test_hugging_face_checkpoint_text(tmp_path, tiny_bert_dir):
    adapter = hf_adapter(tiny_bert_dir, "text", max_length=16)
    items = [
        ProbeItem(index=i, id=str(i), text=t)
        for i, t in enumerate(["the river", "a quiet city window", "music"])
    ]
    layers = resolve_layers(adapter.module, "all")
    assert layers == {"encoder_block_00": "encoder.layer.0", "encoder_block_01": "encoder.layer.1"}
    fs = extract_features(
        items, adapter, layers, tmp_path / "bert", device="cpu", progress=False, lengths=np.array([9, 19, 5])
    )
    assert fs.array("encoder_block_01").shape == (3, 16)
    with pytest.raises(ProbeModelError, match="does not exist"):
        hf_adapter(tmp_path / "nope", "text")


def test_open_features_without_extraction(tmp_path):
    from stethoscope.probe.errors import ProbeStageError

    with pytest.raises(ProbeStageError, match="stethoscope probe features"):
        open_features(tmp_path / "nothing")


def test_hugging_face_checkpoint_audio(tmp_path):
    """A wav2vec2-style checkpoint: feature extractor, sample-level mask mapped onto strided frames."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
    )
    torch.manual_seed(0)
    Wav2Vec2Model(cfg).save_pretrained(tmp_path / "w2v")
    Wav2Vec2FeatureExtractor(sampling_rate=8000, return_attention_mask=True).save_pretrained(tmp_path / "w2v")
    adapter = hf_adapter(tmp_path / "w2v", "audio", sample_rate=8000)
    layers = resolve_layers(adapter.module, "all")
    assert layers == {"encoder_block_00": "encoder.layers.0", "encoder_block_01": "encoder.layers.1"}
    items = _items(5)
    fs = extract_features(
        items,
        adapter,
        layers,
        tmp_path / "f",
        device="cpu",
        batch_size=3,
        progress=False,
        lengths=np.array([len(it.audio) for it in items]),
    )
    assert fs.array("encoder_block_01").shape == (5, 16)
    # channel-first conv outputs pool over the wrong axis unless time_axis says so: a clear error
    conv = {"conv": "feature_extractor.conv_layers.1"}
    with pytest.raises(ProbeModelError, match="time_axis"):
        extract_features(
            items,
            adapter,
            conv,
            tmp_path / "c",
            device="cpu",
            batch_size=2,
            progress=False,
            lengths=np.array([len(it.audio) for it in items]),
        )
    adapter.time_axis = 2
    assert extract_features(
        items, adapter, conv, tmp_path / "c2", device="cpu", batch_size=2, progress=False
    ).array("conv").shape == (5, 8)
