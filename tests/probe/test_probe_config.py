"""The probe YAML config: field-note defaults, did-you-mean errors, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from stethoscope.errors import ConfigError
from stethoscope.probe.config import DatasetConfig, DecisionConfig, PipelineConfig, load_config


def test_defaults_are_the_field_notes():
    d = DecisionConfig()
    assert (d.min_f1_go, d.min_f1_conditional, d.max_f1_nogo) == (0.55, 0.45, 0.40)
    assert d.leakage_margin_pp == 7.0 and d.max_text_drop == 0.10
    ds = DatasetConfig()
    assert (ds.min_targets, ds.min_groups_per_target, ds.min_texts_per_group) == (3, 8, 30)
    assert ds.columns.model_dump() == {
        "id": "utt_id",
        "target": "accent",
        "group": "speaker",
        "nuisance": "speaker",
        "content": "text_id",
        "audio": "rel_path",
        "text": None,
    }
    assert PipelineConfig().representations[0].kind == "frontend"


def test_unknown_key_gets_did_you_mean(tmp_path):
    path = tmp_path / "probe.yaml"
    path.write_text("decision:\n  min_f1_goo: 0.6\n")
    with pytest.raises(ConfigError, match=r"unknown key 'decision.min_f1_goo'.*did you mean 'min_f1_go'"):
        load_config(path)


def test_unknown_key_in_a_representation(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'pooling'"):
        load_config({"representations": [{"name": "x", "kind": "frontend", "poolling": "mean"}]})


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    sub = tmp_path / "exp"
    sub.mkdir()
    (sub / "probe.yaml").write_text("output_dir: out\ndataset: {root: ../data}\n")
    cfg = load_config(sub / "probe.yaml")
    assert cfg.output_dir == (sub / "out").resolve()
    assert cfg.dataset.root == (tmp_path / "data").resolve()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"representations": [{"name": "b", "kind": "hf"}]}, "no 'checkpoint'"),
        ({"representations": [{"name": "b", "kind": "module"}]}, "no 'factory'"),
        ({"representations": [{"name": "a/b", "kind": "frontend"}]}, "without '/'"),
        (
            {"representations": [{"name": "a", "kind": "frontend"}, {"name": "a", "kind": "frontend"}]},
            "repeated: a",
        ),
        ({"decision": {"min_f1_go": 0.4, "min_f1_conditional": 0.5}}, "max_f1_nogo <= min_f1_conditional"),
        ({"probe": {"folds": 1}}, "probe.folds"),
        ({"representations": [{"name": "a", "kind": "frontend", "dtype": "float64"}]}, "dtype"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_invalid_values_are_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data) if isinstance(data, dict) else load_config_list(data)


def load_config_list(data):
    from stethoscope._strict import validate_config

    return validate_config(PipelineConfig, data, "probe config")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(tmp_path / "empty.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config({"seed": 3, "probe": {"C": 0.5}})
    again = load_config(__import__("yaml").safe_load(cfg.to_yaml()), base=Path("/"))
    assert again.model_dump() == cfg.model_dump()
