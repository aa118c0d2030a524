"""The pipeline end to end on synthetic sets with planted attributes, through the CLI and Python."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stethoscope.probe.cli import app
from stethoscope.probe.config import load_config
from stethoscope.probe.pipeline import run_features, run_fit, run_report, run_synth

runner = CliRunner()


def _invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_planted_target_is_found_and_absent_group_is_not(planted):
    rows, decision, _ = planted(1.0, 0.0)
    for r in rows.values():
        assert r["target_f1"] > 0.85 and r["target_f1_ci_low"] > r["chance_f1"]
        assert abs(r["leakage"]) <= 0.07  # nothing about speakers was planted
        assert r["selectivity"] > 0.1
        assert r["converged"]
    assert decision["code"] == "go"


def test_planted_group_shows_up_as_leakage(planted):
    rows, decision, _ = planted(1.0, 1.0)
    assert all(r["leakage"] > 0.3 for r in rows.values())
    assert decision["code"] == "go_conditional" and "leakage" in decision["rationale"]


def test_f1_rises_with_planted_strength_and_zero_is_chance_and_nogo(planted):
    f1 = {s: planted(s)[0]["logmel"]["target_f1"] for s in (0.0, 0.2, 1.0)}
    assert f1[0.0] < f1[0.2] < f1[1.0]
    rows, decision, _ = planted(0.0)
    for r in rows.values():
        assert r["target_f1"] < r["chance_f1"] + 0.1
        assert (
            r["target_f1_ci_low"] < r["chance_f1"] < r["target_f1_ci_high"] or r["target_f1"] < r["chance_f1"]
        )
    assert decision["code"] == "nogo"


def test_run_writes_every_output_and_is_reproducible(tmp_path, make_synth_config, quiet_console):
    cfg_path = tmp_path / "probe.yaml"
    cfg_path.write_text(yaml.safe_dump(make_synth_config(tmp_path, target=1.0)))
    result = _invoke(["run", cfg_path])  # with progress bars, on the fixed-width test console
    assert result.exit_code == 0, result.output
    printed = quiet_console.getvalue()
    assert "features frontend" in printed and "probe metrics" in printed
    assert (
        "Decision: GO (strong) - frontend:logmel" in printed
        or "Decision: GO (strong) - frontend:mfcc" in printed
    )
    out = tmp_path / "out"
    for name in (
        "config.yaml",
        "dataset.json",
        "metrics.csv",
        "details.json",
        "decision.json",
        "report.md",
        "figures/metrics_heatmap.png",
        "figures/confusion_best.png",
        "probe_results.zip",
    ):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Decision" in report and "**Decision:** GO (strong)" in report
    assert "| frontend:logmel (baseline) |" in report and "## Configuration" in report
    assert "fewer than 8 groups" in report  # the size check is repeated in the report
    with zipfile.ZipFile(out / "probe_results.zip") as zf:
        assert {"report.md", "metrics.csv", "config.yaml", "figures/metrics_heatmap.png"} <= set(
            zf.namelist()
        )
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["synth"]["target_strength"] == 1.0 and used["probe"]["folds"] == 4
    first = (out / "metrics.csv").read_bytes()
    assert _invoke(["fit", cfg_path, "--no-progress"]).exit_code == 0
    assert (out / "metrics.csv").read_bytes() == first  # same config, same metrics.csv


def test_stages_alone_and_thresholds_reapplied_by_report(tmp_path, make_synth_config, quiet_console):
    cfg = make_synth_config(tmp_path, target=1.0)
    cfg_path = tmp_path / "probe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _invoke(["fit", cfg_path]).exit_code == 2  # nothing to fit yet
    assert _invoke(["synth", "--config", cfg_path]).exit_code == 0
    assert (tmp_path / "data" / "metadata.csv").is_file()
    assert _invoke(["fit", cfg_path]).exit_code == 2
    assert "run `stethoscope probe features CONFIG` first" in quiet_console.getvalue()
    assert _invoke(["features", cfg_path]).exit_code == 0
    assert _invoke(["features", cfg_path]).exit_code == 0  # done: no model is even built
    assert "features frontend: up to date (2 layers)" in quiet_console.getvalue()
    assert _invoke(["report", cfg_path]).exit_code == 2  # no metrics yet
    assert _invoke(["fit", cfg_path, "--no-progress"]).exit_code == 0
    assert json.loads((tmp_path / "out" / "decision.json").read_text())["code"] == "go"
    cfg["decision"] = {"min_f1_go": 0.999, "min_f1_conditional": 0.5}  # stricter: report alone re-decides
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _invoke(["report", cfg_path]).exit_code == 0
    assert json.loads((tmp_path / "out" / "decision.json").read_text())["code"] == "go_conditional"
    assert "GO (conditional)" in (tmp_path / "out" / "report.md").read_text()


def test_synth_command_writes_a_runnable_set(tmp_path):
    out = tmp_path / "syn"
    r = _invoke(
        [
            "synth",
            out,
            "--targets",
            "2",
            "--groups-per-target",
            "3",
            "--texts",
            "6",
            "--duration",
            "0.2",
            "--sample-rate",
            "8000",
            "--group-strength",
            "0",
        ]
    )
    assert r.exit_code == 0, r.output
    lines = (out / "metadata.csv").read_text().splitlines()
    assert lines[0] == "utt_id,speaker,accent,text_id,rel_path" and len(lines) == 1 + 2 * 3 * 6
    assert len(json.loads((out / "texts.json").read_text())) == 6
    cfg = yaml.safe_load((out / "probe.yaml").read_text())
    cfg["probe"] = {"folds": 3}
    (out / "probe.yaml").write_text(yaml.safe_dump(cfg))
    r = _invoke(["run", out / "probe.yaml", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (out / "probe_out" / "report.md").is_file()
    assert _invoke(["synth"]).exit_code == 2  # neither folder nor config
    assert _invoke(["synth", tmp_path / "x", "--targets", "1"]).exit_code == 2


def test_cli_errors_are_one_line_not_a_traceback(tmp_path, quiet_console):
    (tmp_path / "bad.yaml").write_text("probe:\n  fodls: 3\n")
    r = _invoke(["run", tmp_path / "bad.yaml"])
    printed = quiet_console.getvalue()
    assert r.exit_code == 2 and "error:" in printed and "did you mean 'folds'" in printed
    assert "Traceback" not in printed + r.output
    r = _invoke(["run", tmp_path / "missing.yaml"])
    assert r.exit_code == 2 and "does not exist" in quiet_console.getvalue()


def test_custom_module_backbone_with_factory_and_python_adapter(
    tmp_path, make_synth_config, factory_module, audio_adapter
):
    reps = [
        {
            "name": "tiny",
            "kind": "module",
            "factory": f"{factory_module}:make",
            "factory_kwargs": {"dim": 6},
            "pooling": "mean_std",
            "batch_size": 8,
        },
        {"name": "tts", "kind": "module", "factory": "unused:unused", "layers": ["decoder_block_00", "proj"]},
        {"name": "frontend", "kind": "frontend", "frontend": {"n_mels": 16, "n_mfcc": 8}},
    ]
    cfg = load_config(make_synth_config(tmp_path, target=1.0, representations=reps))
    run_synth(cfg)
    feats = run_features(cfg, adapters={"tts": audio_adapter(8000)}, progress=False)
    assert feats["tiny"].array("block_01").shape == (96, 12)
    assert feats["tts"].layers == ["decoder_block_00", "proj"]
    out = run_fit(cfg, progress=False)
    names = [f"{r['representation']}:{r['layer']}" for r in out.rows]
    assert names == [
        "tiny:block_00",
        "tiny:block_01",
        "tts:decoder_block_00",
        "tts:proj",
        "frontend:logmel",
        "frontend:mfcc",
    ]
    assert all(r["baseline"] == r["representation"].startswith("frontend") for r in out.rows)
    decision = json.loads((Path(cfg.output_dir) / "decision.json").read_text())
    assert not decision["best"].startswith("frontend:")  # baselines are never the chosen layer
    assert run_report(cfg).is_file()


def test_without_content_text_drop_is_na_and_said_so(tmp_path, make_synth_config):
    cfg = make_synth_config(tmp_path, target=1.0)
    cfg["dataset"]["columns"] = {"content": None}
    cfg = load_config(cfg)
    run_synth(cfg)
    run_features(cfg, progress=False)
    out = run_fit(cfg, progress=False)
    assert all(r["text_drop"] != r["text_drop"] for r in out.rows)  # NaN
    assert all(r["leakage"] == r["leakage"] for r in out.rows)  # leakage still measured (item folds)
    report = run_report(cfg).read_text()
    assert "Text drop not measured" in report and "| n/a |" in report


@pytest.mark.parametrize("mode", ["uniform"])
def test_uniform_leakage_chance(tmp_path, make_synth_config, mode):
    cfg = load_config(
        make_synth_config(tmp_path, target=1.0, probe={"folds": 4, "leakage_chance": mode, "control": False})
    )
    run_synth(cfg)
    run_features(cfg, progress=False)
    rows = run_fit(cfg, progress=False).rows
    assert rows[0]["nuisance_chance_f1"] == pytest.approx(1 / 12)
    assert rows[0]["control_f1"] != rows[0]["control_f1"]  # control off: NaN
