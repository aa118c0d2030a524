"""Tap specs, poolings in one pass, the threads option, and factories found next to the config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from stethoscope.errors import ConfigError
from stethoscope.probe.config import load_config
from stethoscope.probe.errors import ProbeLayerError, ProbeModelError
from stethoscope.probe.features import (
    ModelInputs,
    ProbeAdapter,
    extract_features,
    load_factory,
    resolve_layers,
)
from stethoscope.probe.manifest import ProbeItem
from stethoscope.probe.pooling import pool_steps
from stethoscope.probe.taps import POOLINGS, Tap, parse_tap


def test_spec_syntax_round_trips_and_bad_specs_say_why():
    tap = parse_tap("lstm.layers.1:output[1][0][-1]@mean,last")
    assert tap == Tap(
        "lstm.layers.1", "output", (("index", 1), ("index", 0), ("index", -1)), ("mean", "last"), True
    )
    for spec in (
        "lstm:output[1][0]",
        "enc:output['hidden'].states[2]",
        "proj:input[0]",
        "block_01@first",
        "x",
    ):
        assert str(parse_tap(spec)) == spec
    assert parse_tap('m:input["mask"]').path == (("key", "mask"),)
    with pytest.raises(ProbeLayerError, match=r"after ':' comes 'output' or 'input'.*not 'outputs\[0\]'"):
        parse_tap("lstm:outputs[0]")
    with pytest.raises(ProbeLayerError, match=r"cannot read accessor '\[1'"):
        parse_tap("lstm:output[1")
    with pytest.raises(ProbeLayerError, match=r"unknown pooling 'avg' after '@'; choose from mean, std"):
        parse_tap("lstm@avg")


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    pooled: torch.Tensor


class DictNet(torch.nn.Module):
    """Outputs in a dict, in a dataclass, and a sub-module whose input is worth probing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 2)
        self.wrap = torch.nn.Identity()

    def forward(self, x, scale=1.0):
        h = self.enc(x) * scale  # (B, T, 4)
        pooled = self.head(h.mean(1))  # (B, 2)
        self.wrap(Out(h, pooled))
        return {"states": (h, h * 2), "pooled": pooled}


def test_paths_into_dicts_dataclasses_and_inputs(tmp_path):
    x = torch.randn(3, 5, 3)
    items = [ProbeItem(index=i, id=str(i)) for i in range(3)]
    adapter = ProbeAdapter(DictNet(), lambda b: ModelInputs(args=(x,), kwargs={"scale": 2.0}))
    layers = resolve_layers(
        adapter.module,
        ["root", "wrap:output.pooled", "head:input[0]", "enc:input", "wrap:output.hidden"],
        {"root": ":output['states'][1]"},  # the model itself: an empty module name
    )
    fs = extract_features(items, adapter, layers, tmp_path / "f", pooling=["mean", "max"], progress=False)
    with torch.no_grad():
        h = adapter.module.enc(x) * 2.0
    np.testing.assert_allclose(fs.array("root@mean"), (2 * h).mean(1), atol=1e-6)
    np.testing.assert_allclose(fs.array("root@max"), (2 * h).amax(1), atol=1e-6)
    np.testing.assert_allclose(fs.array("wrap:output.hidden@mean"), h.mean(1), atol=1e-6)
    np.testing.assert_allclose(fs.array("head:input[0]"), h.mean(1), atol=1e-6)  # 2-D: stored once
    np.testing.assert_allclose(fs.array("enc:input@mean"), x.mean(1), atol=1e-6)
    assert fs.array("wrap:output.pooled").shape == (3, 2)
    assert not any(name.startswith("head:input[0]@") for name in fs.layers)


def test_a_wrong_path_lists_what_the_output_holds(tmp_path):
    items = [ProbeItem(index=i, id=str(i)) for i in range(2)]
    adapter = ProbeAdapter(DictNet(), lambda b: torch.randn(2, 5, 3))
    with pytest.raises(
        ProbeModelError,
        match=r"output has no \['hidden'\]; output is output\['states'\]\[0\]: Tensor\(2, 5, 4\) float32; "
        r"output\['states'\]\[1\]: Tensor\(2, 5, 4\) float32; output\['pooled'\]: Tensor\(2, 2\)",
    ):
        extract_features(items, adapter, {"r": ":output['hidden']"}, tmp_path / "a", progress=False)
    with pytest.raises(ProbeModelError, match=r"output\['states'\] is not a floating tensor but"):
        extract_features(items, adapter, {"r": ":output['states']"}, tmp_path / "b", progress=False)
    with pytest.raises(ProbeModelError, match=r"input has no \[3\]; input is input\[0\]: Tensor\(2, 5, 3\)"):
        extract_features(items, adapter, {"r": "enc:input[3]"}, tmp_path / "c", progress=False)
    with pytest.raises(ProbeModelError, match="1-D tensor"):
        extract_features(items, adapter, {"r": "head:output[0]"}, tmp_path / "d", progress=False)
    with pytest.raises(
        ProbeLayerError, match=r"layer 'ecn' is neither an alias nor a module.*did you mean 'enc'"
    ):
        resolve_layers(adapter.module, ["ecn:output[0]"])


def test_poolings_against_a_naive_reference():
    torch.manual_seed(0)
    h = torch.randn(4, 6, 3)
    m = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]).float()
    got = pool_steps(h, m, POOLINGS)
    for b in range(4):
        valid = h[b, m[b] > 0]  # (n_b, 3)
        ref = {
            "mean": valid.mean(0),
            "std": valid.std(0, unbiased=False),
            "max": valid.amax(0),
            "first": valid[0],  # left padding too: the first *valid* step
            "last": valid[-1],
        }
        ref["mean_std"] = torch.cat([ref["mean"], ref["std"]])
        for mode, value in ref.items():
            torch.testing.assert_close(got[mode][b], value, rtol=0, atol=1e-6)


def _audio_items(n=10):
    rng = np.random.default_rng(0)
    return [
        ProbeItem(index=i, id=f"u{i}", audio=rng.normal(size=800 + 80 * i).astype(np.float32))
        for i in range(n)
    ]


def test_several_poolings_in_one_pass_equal_separate_passes(tmp_path, audio_adapter):
    items = _audio_items()
    lengths = np.array([len(it.audio) for it in items])
    adapter = audio_adapter()
    layers = resolve_layers(
        adapter.module, ["decoder_block_01", "proj", "proj_last"], {"proj_last": "proj@last"}
    )
    modes = list(POOLINGS)
    before = adapter.module.calls
    one = extract_features(
        items, adapter, layers, tmp_path / "one", pooling=modes, batch_size=4, lengths=lengths, progress=False
    )
    assert adapter.module.calls - before == 3  # one forward per batch of 4, for all six poolings
    assert one.layers == [f"decoder_block_01@{m}" for m in modes] + [f"proj@{m}" for m in modes] + [
        "proj_last"
    ]
    for mode in modes:
        sep = extract_features(
            items,
            audio_adapter(),
            {"b": "decoder.layers.1", "p": "proj"},
            tmp_path / mode,
            pooling=mode,
            batch_size=4,
            lengths=lengths,
            progress=False,
        )
        np.testing.assert_array_equal(one.array(f"decoder_block_01@{mode}"), sep.array("b"))
        np.testing.assert_array_equal(one.array(f"proj@{mode}"), sep.array("p"))
    np.testing.assert_array_equal(one.array("proj_last"), one.array("proj@last"))  # the spec's own pooling
    with pytest.raises(
        ProbeLayerError, match=r"layers 'proj' and 'proj@last' would both be stored as 'proj@last'"
    ):
        extract_features(
            items,
            adapter,
            {"proj": "proj", "proj@last": "proj@last"},
            tmp_path / "clash",
            pooling=["mean", "last"],
            progress=False,
        )
    assert one.meta["layers"]["decoder_block_01@mean_std"] == {
        "module": "decoder.layers.1", "layer": "decoder_block_01", "pooling": "mean_std", "dim": 48,
        "file": "decoder_block_01_mean_std.npy",
    }  # fmt: skip


def test_threads_apply_to_the_forward_and_are_restored(tmp_path):
    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return self.lin(x)

    items = [ProbeItem(index=i, id=str(i)) for i in range(4)]
    adapter = ProbeAdapter(Net(), lambda b: torch.ones(len(b), 3, 2))
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    extract_features(
        items, adapter, {"lin": "lin"}, tmp_path / "a", threads=target, batch_size=2, progress=False
    )
    assert seen == [target, target] and torch.get_num_threads() == before
    extract_features(
        items, adapter, {"lin": "lin"}, tmp_path / "b", threads=None, batch_size=4, progress=False
    )
    assert seen[-1] == before


FACTORY = """
import torch
from HELPER import width   # a sibling module: the factory's folder is importable while it runs
from stethoscope.probe import ProbeAdapter

def make(sample_rate, scale=1):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, width()), torch.nn.Linear(width(), width()))
    net.sample_rate = sample_rate * scale
    return ProbeAdapter(net, lambda items: torch.ones(len(items), 3, 1))
"""


def test_factories_next_to_the_config_and_by_file_path(tmp_path):
    from stethoscope.probe.pipeline import build_adapter

    folder = tmp_path / "project"
    (folder / "models").mkdir(parents=True)
    (folder / "cfg_helper_a.py").write_text("def width():\n    return 5\n")
    (folder / "cfg_factory_mod.py").write_text(FACTORY.replace("HELPER", "cfg_helper_a"))
    (folder / "models" / "cfg_helper_b.py").write_text("def width():\n    return 7\n")
    (folder / "models" / "enc.py").write_text(FACTORY.replace("HELPER", "cfg_helper_b"))
    reps = [
        {"name": "a", "kind": "module", "factory": "cfg_factory_mod:make"},
        {"name": "b", "kind": "module", "factory": "models/enc.py:make", "factory_kwargs": {"scale": 2}},
        {"name": "c", "kind": "module", "factory": "missing_mod_xyz:make"},
        {"name": "d", "kind": "module", "factory": "models/nope.py:make"},
    ]
    (folder / "probe.yaml").write_text(
        yaml.safe_dump({"dataset": {"sample_rate": 22050}, "representations": reps})
    )
    cfg = load_config(folder / "probe.yaml")
    a = build_adapter(cfg.representations[0], cfg)
    assert a.module.sample_rate == 22050 and a.module[0].out_features == 5  # the dataset's rate, passed in
    b = build_adapter(cfg.representations[1], cfg)
    assert b.module.sample_rate == 44100 and b.module[0].out_features == 7  # its own folder's sibling
    assert str(folder) not in __import__("sys").path  # not left behind
    with pytest.raises(
        ProbeModelError, match=r"cannot import factory 'missing_mod_xyz:make'.*config's folder"
    ):
        build_adapter(cfg.representations[2], cfg)
    with pytest.raises(ProbeModelError, match=r"factory file .*nope.py' does not exist"):
        build_adapter(cfg.representations[3], cfg)
    with pytest.raises(ProbeModelError, match=r"has no function 'mkae' \(it has make"):
        load_factory("models/enc.py:mkae", base_dir=folder)


def test_config_accepts_pooling_lists_threads_and_validates_specs(tmp_path):
    rep = {"name": "r", "kind": "module", "factory": "m:f"}
    cfg = load_config({"representations": [{**rep, "pooling": ["mean", "last"], "threads": 2}]})
    assert cfg.representations[0].poolings == ["mean", "last"] and cfg.representations[0].threads == 2
    assert load_config({"representations": [rep]}).representations[0].threads == 1
    for bad, match in [
        ({"pooling": ["mean", "mean"]}, "pooling lists mean twice"),
        ({"pooling": []}, "at least one pooling"),
        ({"pooling": "avg"}, "pooling"),
        ({"threads": 0}, "threads"),
        ({"layers": ["lstm:output[1"]}, r"cannot read accessor"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config({"representations": [{**rep, **bad}]})
