"""The manifest: field-note format, column roles, validation errors, size warnings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stethoscope.probe.config import DatasetConfig, SynthConfig
from stethoscope.probe.errors import ProbeDataError
from stethoscope.probe.manifest import load_audio, load_manifest
from stethoscope.probe.synth import write_synthetic


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_synthetic(
        root, SynthConfig(targets=3, groups_per_target=2, texts=4, duration_s=0.1, sample_rate=8000)
    )
    return root


def _cfg(root, **kw):
    return DatasetConfig(root=root, sample_rate=8000, **kw)


def test_loads_the_field_note_format(small_set):
    m = load_manifest(_cfg(small_set), folds=2)
    assert len(m) == 3 * 2 * 4
    assert set(m.target) == {"acc0", "acc1", "acc2"}
    assert m.nuisance is not None and (m.nuisance == m.group).all()
    assert m.content is not None and len(set(m.content)) == 4
    assert all(p.is_file() for p in m.audio_paths)
    assert (m.lengths > 0).all()
    s = m.summary()
    assert s["groups_per_target"] == {"acc0": 2, "acc1": 2, "acc2": 2} and s["contents"] == 4
    item = load_audio(m.items()[:1], 8000)[0]
    assert item.audio.dtype == np.float32 and item.audio.ndim == 1
    assert m.items()[0].audio is None  # the manifest's own items never hold waveforms


def test_size_check_warns_like_the_field_note(small_set):
    warnings = load_manifest(_cfg(small_set), folds=2).warnings
    assert any("fewer than 8 groups" in w for w in warnings)
    assert any("fewer than 30 texts" in w for w in warnings)
    assert not any("target classes" in w for w in warnings)  # 3 accents is the minimum, not below it


def _write_text_set(
    root, n_targets=3, groups=8, texts=30, header="utt_id,speaker,accent,text_id", extra=None
):
    root.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for t in range(n_targets):
        for g in range(groups):
            for j in range(texts):
                lines.append(f"u{t}_{g}_{j},s{t}_{g},a{t},t{j}")
    lines += extra or []
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    (root / "texts.json").write_text(json.dumps({f"t{j}": f"text number {j}" for j in range(texts)}))
    return root


def test_a_set_of_recommended_size_has_no_warning(tmp_path):
    root = _write_text_set(tmp_path / "big")
    m = load_manifest(_cfg(root, input="text", columns={"audio": None}), folds=5)
    assert m.warnings == []
    assert m.texts[0] == "text number 0"


def test_texts_json_as_a_list(tmp_path):
    root = _write_text_set(tmp_path / "l", groups=2, texts=3)
    (root / "texts.json").write_text(json.dumps([{"id": f"t{j}", "text": f"#{j}"} for j in range(3)]))
    m = load_manifest(_cfg(root, input="text", columns={"audio": None}), folds=2)
    assert set(m.texts) == {"#0", "#1", "#2"}


def test_na_is_a_label_not_a_missing_value(tmp_path):
    root = tmp_path / "na"
    root.mkdir()
    rows = ["id,grp,acc,text"] + [f"{i},g{i % 4},{'NA' if i % 4 < 2 else 'SE'},hello {i}" for i in range(16)]
    (root / "metadata.csv").write_text("\n".join(rows))
    cols = {
        "id": "id",
        "group": "grp",
        "target": "acc",
        "text": "text",
        "nuisance": None,
        "content": None,
        "audio": None,
    }
    m = load_manifest(_cfg(root, input="text", columns=cols), folds=2)
    assert set(m.target) == {"NA", "SE"}


def test_non_audio_roles(tmp_path):
    """Any table fits once its columns are mapped: here a text set without id, nuisance or content."""
    root = tmp_path / "t"
    root.mkdir()
    rows = ["label,doc,sentence"] + [f"c{i % 2},d{i % 6},sentence {i}" for i in range(24)]
    (root / "data.csv").write_text("\n".join(rows))
    cols = {
        "id": None,
        "target": "label",
        "group": "doc",
        "text": "sentence",
        "nuisance": None,
        "content": None,
        "audio": None,
    }
    m = load_manifest(_cfg(root, manifest="data.csv", input="text", columns=cols), folds=3)
    assert m.ids[0] == "row000000" and m.content is None and m.nuisance is None
    assert any("items" in w for w in m.warnings)


# --- errors ---------------------------------------------------------------------------------------


def test_missing_manifest(tmp_path):
    with pytest.raises(ProbeDataError, match=r"does not exist.*stethoscope probe synth"):
        load_manifest(_cfg(tmp_path))


def test_unknown_column_did_you_mean(small_set):
    with pytest.raises(ProbeDataError, match=r"columns.target names column 'acent'.*did you mean 'accent'"):
        load_manifest(_cfg(small_set, columns={"target": "acent"}), folds=2)


def test_missing_audio_files(small_set, tmp_path):
    root = tmp_path / "missing"
    root.mkdir()
    text = (small_set / "metadata.csv").read_text()
    (root / "metadata.csv").write_text(text)
    with pytest.raises(ProbeDataError, match=r"24 of 24 audio files .* are missing"):
        load_manifest(_cfg(root), folds=2)


def test_audio_dir_hint(small_set, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    import shutil

    shutil.copytree(small_set / "wav", root, dirs_exist_ok=True)  # files at root/<spk>/<t>.wav
    shutil.copy(small_set / "metadata.csv", root)
    with pytest.raises(ProbeDataError, match=r"audio_dir: '\.'"):
        load_manifest(_cfg(root), folds=2)
    assert len(load_manifest(_cfg(root, audio_dir="."), folds=2)) == 24


def test_unreadable_audio(small_set, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(small_set, root)
    first = (root / "metadata.csv").read_text().splitlines()[1].split(",")[-1]
    (root / "wav" / first).write_bytes(b"this is not a wav file at all")
    with pytest.raises(ProbeDataError, match=r"cannot read audio file .*as WAV"):
        load_manifest(_cfg(root), folds=2)


def test_a_class_with_one_group(tmp_path):
    root = _write_text_set(tmp_path / "one", groups=2, texts=2, extra=["x,lonely,a9,t0"])
    with pytest.raises(ProbeDataError, match=r"'a9' have a single group"):
        load_manifest(_cfg(root, input="text", columns={"audio": None}), folds=2)


def test_too_few_groups_for_the_folds(tmp_path):
    root = _write_text_set(tmp_path / "few", n_targets=2, groups=2, texts=2)
    with pytest.raises(ProbeDataError, match=r"4 groups cannot fill 5 group-disjoint folds"):
        load_manifest(_cfg(root, input="text", columns={"audio": None}), folds=5)


def test_duplicate_ids_and_empty_cells(tmp_path):
    root = _write_text_set(tmp_path / "dup", groups=2, texts=2, extra=["u0_0_0,s0_0,a0,t0"])
    with pytest.raises(ProbeDataError, match="repeats item ids"):
        load_manifest(_cfg(root, input="text", columns={"audio": None}), folds=2)
    root = _write_text_set(tmp_path / "empty", groups=2, texts=2, extra=["zz,s0_0,,t0"])
    with pytest.raises(ProbeDataError, match=r"column 'accent' \(target\) is empty on 1 row"):
        load_manifest(_cfg(root, input="text", columns={"audio": None}), folds=2)


def test_single_target_class(tmp_path):
    root = _write_text_set(tmp_path / "single", n_targets=1, groups=3, texts=2)
    with pytest.raises(ProbeDataError, match="single class"):
        load_manifest(_cfg(root, input="text", columns={"audio": None}), folds=2)


def test_text_input_without_text(tmp_path):
    root = _write_text_set(tmp_path / "nt", groups=2, texts=2)
    with pytest.raises(ProbeDataError, match="there is no text"):
        load_manifest(_cfg(root, input="text", texts=None, columns={"audio": None}), folds=2)
    (root / "texts.json").write_text(json.dumps({"t0": "only one"}))
    with pytest.raises(ProbeDataError, match=r"1 content ids .* are not in 'texts.json'"):
        load_manifest(_cfg(root, input="text", columns={"audio": None}), folds=2)


def test_synth_never_overwrites_a_real_dataset(tmp_path):
    from stethoscope.probe.errors import ProbeStageError

    root = _write_text_set(tmp_path / "real", groups=2, texts=2)
    with pytest.raises(ProbeStageError, match="did not write"):
        write_synthetic(root, SynthConfig(targets=2, groups_per_target=1, texts=1, duration_s=0.05))
    assert "u0_0_0" in (root / "metadata.csv").read_text()
