"""A pretrained multi-layer LSTM probed per layer, with h_n and packed batches, through a short factory.

The oracle is the issue's workaround, computed here: the LSTM split by hand into single-layer LSTMs with
copied weights, run on each item alone (no padding at all).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stethoscope.probe.audio import LogMel
from stethoscope.probe.config import load_config
from stethoscope.probe.features import ModelInputs, ProbeAdapter, _Capture, extract_features, resolve_layers
from stethoscope.probe.manifest import ProbeItem, load_audio
from stethoscope.probe.pipeline import _manifest, run_features, run_fit, run_synth
from stethoscope.probe.recurrent import LayerRunner

# the user's own package: a speaker encoder (3-layer LSTM over log-mel frames + a linear embedding)
ENCODER = """
import torch


class SpeakerEncoder(torch.nn.Module):
    def __init__(self, n_mels=16, hidden=24, emb=8):
        super().__init__()
        self.lstm = torch.nn.LSTM(n_mels, hidden, num_layers=3, batch_first=True)
        self.embed = torch.nn.Linear(hidden, emb)

    def forward(self, frames):  # a PackedSequence of (T_i, n_mels), or a padded (B, T, n_mels)
        _, (h_n, _) = self.lstm(frames)
        return self.embed(h_n[-1])
"""

# the whole factory a user writes to probe it: 15 lines, the model untouched
FACTORY = """
import torch
from speaker_encoder import SpeakerEncoder
from stethoscope.probe import ModelInputs, ProbeAdapter
from stethoscope.probe.audio import LogMel

def make(checkpoint, sample_rate):
    model = SpeakerEncoder()
    model.load_state_dict(torch.load(checkpoint))
    logmel = LogMel(sample_rate, n_mels=16)
    def preprocess(items):
        frames = [logmel(torch.from_numpy(it.audio)[None])[0] for it in items]  # (T_i, 16) each
        packed = torch.nn.utils.rnn.pack_sequence(frames, enforce_sorted=False)
        return ModelInputs(args=(packed,))
    return ProbeAdapter(model, preprocess)
"""


def _hand_split(lstm: torch.nn.LSTM) -> list[torch.nn.LSTM]:
    """The workaround: one single-layer LSTM per layer, weights copied."""
    singles = []
    for k in range(lstm.num_layers):
        one = torch.nn.LSTM(
            lstm.input_size if k == 0 else lstm.hidden_size, lstm.hidden_size, batch_first=True
        )
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(one, f"{name}_l0").copy_(getattr(lstm, f"{name}_l{k}"))
        singles.append(one.eval())
    return singles


@pytest.fixture(scope="module")
def speaker_probe(tmp_path_factory):
    """The synthetic audio set probed through the factory next to the config (no PYTHONPATH)."""
    root = tmp_path_factory.mktemp("speaker")
    (root / "speaker_encoder.py").write_text(ENCODER)
    (root / "probe_factory.py").write_text(FACTORY)
    assert len(FACTORY.strip().splitlines()) <= 20
    import sys

    sys.path.insert(0, str(root))  # only to build the "pretrained" checkpoint; taken off before probing
    try:
        from speaker_encoder import SpeakerEncoder

        torch.manual_seed(0)
        torch.save(SpeakerEncoder().state_dict(), root / "encoder.pt")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("speaker_encoder", None)
    cfg = {
        "output_dir": "out",  # relative: resolved against the config's folder
        "dataset": {"root": "data", "sample_rate": 8000},
        "synth": {"targets": 3, "groups_per_target": 4, "texts": 8, "duration_s": 0.25, "sample_rate": 8000},
        "representations": [
            {
                "name": "speaker",
                "kind": "module",
                "factory": "probe_factory:make",  # found next to the config, sample_rate passed in
                "factory_kwargs": {"checkpoint": str(root / "encoder.pt")},
                "layers": [
                    "lstm_layer_00",
                    "lstm_layer_01",
                    "lstm_layer_02",
                    "h_n",
                    "h_n_1",
                    "embed",
                    "lstm",
                ],
                "aliases": {"h_n": "lstm:output[1][0]", "h_n_1": "lstm.layers.1:output[1][0]"},
                "pooling": ["mean", "last"],
                "batch_size": 16,
            }
        ],
        "probe": {"folds": 4},
    }
    (root / "probe.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(root / "probe.yaml")
    run_synth(config)
    feats = run_features(config, progress=False)["speaker"]
    return config, feats, root


def test_per_layer_h_n_and_packed_batches_match_the_hand_split_lstm(speaker_probe):
    config, feats, root = speaker_probe
    assert feats.layers == [
        "lstm_layer_00@mean", "lstm_layer_00@last", "lstm_layer_01@mean", "lstm_layer_01@last",
        "lstm_layer_02@mean", "lstm_layer_02@last", "h_n", "h_n_1", "embed", "lstm@mean", "lstm@last",
    ]  # fmt: skip
    assert feats.meta["layers"]["h_n"]["module"] == "lstm:output[1][0]"
    assert feats.meta["layers"]["lstm_layer_01@mean"]["module"] == "lstm.layers.1"
    assert feats.meta["layers"]["embed"]["pooling"] == "none"  # 2-D: stored once, never pooled or padded

    state = torch.load(root / "encoder.pt")
    lstm = torch.nn.LSTM(16, 24, num_layers=3, batch_first=True)
    lstm.load_state_dict({k[len("lstm.") :]: v for k, v in state.items() if k.startswith("lstm.")})
    singles = _hand_split(lstm)
    embed = torch.nn.Linear(24, 8)
    embed.load_state_dict({k[len("embed.") :]: v for k, v in state.items() if k.startswith("embed.")})
    logmel = LogMel(8000, n_mels=16)
    items = load_audio(_manifest(config, check_audio=False).items(), 8000)
    arr = {name: np.asarray(feats.array(name)) for name in feats.layers}  # (N, D) each, read once
    lengths = set()
    with torch.no_grad():
        for i, it in enumerate(items):
            x = logmel(torch.from_numpy(it.audio)[None])  # (1, T_i, 16): this item alone, no padding
            lengths.add(x.shape[1])
            h_all = []
            for k, single in enumerate(singles):
                x, (h, _) = single(x)  # (1, T_i, 24), (1, 1, 24)
                h_all.append(h[0, 0])
                np.testing.assert_allclose(arr[f"lstm_layer_0{k}@mean"][i], x[0].mean(0), atol=1e-5)
                np.testing.assert_allclose(arr[f"lstm_layer_0{k}@last"][i], x[0, -1], atol=1e-5)
            np.testing.assert_allclose(arr["h_n"][i], torch.cat(h_all), atol=1e-5)  # (3 * 24,)
            np.testing.assert_allclose(arr["h_n_1"][i], h_all[1], atol=1e-5)
            np.testing.assert_allclose(arr["embed"][i], embed(h_all[2]), atol=1e-5)
    assert len(lengths) > 3  # items of several lengths: the batches really were ragged
    # the fused module's top layer and its recomputed layer 2 are the same numbers
    np.testing.assert_array_equal(feats.array("lstm@mean"), feats.array("lstm_layer_02@mean"))


def test_padding_instead_of_packing_would_have_leaked(speaker_probe):
    """The issue's 62 of 960: padded frames change a plain forward's h_n; the packed features do not."""
    config, feats, root = speaker_probe
    state = torch.load(root / "encoder.pt")
    lstm = torch.nn.LSTM(16, 24, num_layers=3, batch_first=True)
    lstm.load_state_dict({k[len("lstm.") :]: v for k, v in state.items() if k.startswith("lstm.")})
    items = load_audio(_manifest(config, check_audio=False).items(), 8000)
    logmel = LogMel(8000, n_mels=16)
    frames = [logmel(torch.from_numpy(it.audio)[None])[0] for it in items]
    with torch.no_grad():
        _, (h, _) = lstm(torch.nn.utils.rnn.pad_sequence(frames, batch_first=True))  # padded, not packed
    padded = h.transpose(0, 1).reshape(len(items), -1).numpy()  # (N, 3 * 24)
    short = np.array([len(f) < max(len(g) for g in frames) for f in frames])
    changed = np.abs(padded - feats.array("h_n")).max(1) > 1e-3
    assert changed[short].all() and not changed[~short].any()


def test_probing_the_layers_end_to_end(speaker_probe):
    config, _, _ = speaker_probe
    rows = run_fit(config, progress=False).rows
    assert [r["layer"] for r in rows][:3] == [
        "lstm_layer_00@mean",
        "lstm_layer_00@last",
        "lstm_layer_01@mean",
    ]
    by = {r["layer"]: r for r in rows}
    assert by["h_n"]["dim"] == 72 and by["h_n_1"]["dim"] == 24 and by["embed"]["dim"] == 8
    assert by["h_n"]["module"] == "lstm:output[1][0]" and all(r["converged"] for r in rows)
    saved = json.loads((Path(config.output_dir) / "features" / "speaker" / "meta.json").read_text())
    assert saved["complete"]


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.LSTM(5, 6, num_layers=3, batch_first=True),
        lambda: torch.nn.LSTM(5, 6, num_layers=3, bidirectional=True),  # (T, B, H), both directions
        lambda: torch.nn.LSTM(5, 6, num_layers=2, batch_first=True, proj_size=3),
        lambda: torch.nn.GRU(5, 6, num_layers=3, batch_first=True, bidirectional=True),
        lambda: torch.nn.RNN(5, 6, num_layers=2, batch_first=True, nonlinearity="relu"),
    ],
    ids=["lstm", "lstm-bi-time-first", "lstm-proj", "gru-bi", "rnn-relu"],
)
def test_each_layer_is_computed_exactly(make):
    """The recomputed top layer equals the fused module bit for bit; every layer's final state equals the
    fused module's h_n slice, with and without an initial state."""
    torch.manual_seed(0)
    rnn = make().eval()
    dirs = 2 if rnn.bidirectional else 1
    x = torch.randn(4, 7, 5) if rnn.batch_first else torch.randn(7, 4, 5)
    hsize = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
    h0 = torch.randn(rnn.num_layers * dirs, 4, hsize)
    hx = (
        (h0, torch.randn(rnn.num_layers * dirs, 4, rnn.hidden_size)) if isinstance(rnn, torch.nn.LSTM) else h0
    )
    for args in ((x,), (x, hx)):
        with torch.no_grad():
            out, state = rnn(*args)
            per_layer = LayerRunner(rnn).run(args, {}, rnn.num_layers - 1)
        assert torch.equal(per_layer[-1][0], out)
        h_n = state[0] if isinstance(state, tuple) else state
        for k, (_, s) in enumerate(per_layer):
            s = s[0] if isinstance(s, tuple) else s
            torch.testing.assert_close(s, h_n[k * dirs : (k + 1) * dirs], rtol=0, atol=1e-6)


def test_taps_on_a_fused_lstm_without_packing(tmp_path):
    """A time-first bidirectional LSTM with a padded batch and a mask: taps reorder to batch first."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.rnn = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)  # (T, B, 2 * 4)
    x = torch.randn(6, 5, 3)  # (T, B, 3)
    lengths = torch.tensor([6, 3, 1, 6, 2])
    mask = torch.arange(6)[None] < lengths[:, None]  # (B, T)
    items = [ProbeItem(index=i, id=str(i)) for i in range(5)]
    adapter = ProbeAdapter(net, lambda b: ModelInputs(args=(x,), mask=mask))
    layers = resolve_layers(net, ["rnn_layer_00", "rnn:output[1][1]", "rnn:input[0]"])
    assert layers == {"rnn_layer_00": "rnn.layers.0", "rnn:output[1][1]": "rnn:output[1][1]",
                      "rnn:input[0]": "rnn:input[0]"}  # fmt: skip
    fs = extract_features(
        items, adapter, layers, tmp_path / "f", pooling="mean", batch_size=5, progress=False
    )
    with torch.no_grad():
        first, _ = LayerRunner(net.rnn).run((x,), {}, 0)[0]  # (T, B, 8)
        _, (_, c_n) = net.rnn(x)  # (2 * 2, B, 4)
    for b, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(fs.array("rnn_layer_00")[b], first[:n, b].mean(0), atol=1e-6)
        np.testing.assert_allclose(fs.array("rnn:input[0]")[b], x[:n, b].mean(0), atol=1e-6)
    np.testing.assert_allclose(fs.array("rnn:output[1][1]"), c_n.transpose(0, 1).reshape(5, 16), atol=1e-6)
    with _Capture(net, {"bad": "rnn.layers.0:output[2]"}, "mean", 1) as cap:
        cap.mask = mask
        with pytest.raises(
            Exception, match=r"output\[0\]: Tensor\(6, 5, 8\).*output\[1\]\[0\]: Tensor\(2, 5, 4\)"
        ):
            net(x)
    from stethoscope.probe.errors import ProbeLayerError

    with pytest.raises(ProbeLayerError, match=r"rnn \(LSTM\) has 2 layers, rnn.layers.0 to rnn.layers.1"):
        resolve_layers(net, ["rnn.layers.2"])


def test_the_packed_lstm_example_builds_from_its_folder(monkeypatch):
    """examples/probe_lstm: the factory is found next to its config, not the fixture's namesake."""
    import sys

    from stethoscope.probe.pipeline import build_adapter

    monkeypatch.delitem(sys.modules, "speaker_encoder", raising=False)  # the fixture's, a different class

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "probe_lstm" / "probe.yaml")
    rep = cfg.representations[0]
    adapter = build_adapter(rep, cfg)
    layers = resolve_layers(adapter.module, rep.layers, rep.aliases)
    assert layers["lstm_layer_01"] == "lstm.layers.1" and layers["h_n"] == "lstm:output[1][0]"
    rng = np.random.default_rng(0)
    items = [
        ProbeItem(index=i, id=str(i), audio=rng.normal(size=2000 + 400 * i).astype(np.float32))
        for i in range(3)
    ]
    inputs = adapter.preprocess(items)
    assert isinstance(inputs.args[0], torch.nn.utils.rnn.PackedSequence)
    assert adapter.module.lstm.hidden_size == 64  # the example's encoder
