"""GO / NOGO rules, thresholds at their boundaries, n/a metrics, baselines."""

from __future__ import annotations

import math

import pytest

from stethoscope.probe.config import DecisionConfig
from stethoscope.probe.decision import decide, row_status

CFG = DecisionConfig()


def row(layer, f1, leak=0.0, drop=0.0, baseline=False, rep="backbone"):
    return {
        "representation": rep,
        "layer": layer,
        "target_f1": f1,
        "leakage": leak,
        "text_drop": drop,
        "baseline": baseline,
        "chance_f1": 0.33,
    }


@pytest.mark.parametrize(
    ("rows", "code", "best"),
    [
        ([row("b02", 0.50), row("b08", 0.72, 0.03, 0.05)], "go", "backbone:b08"),
        (
            [row("b08", 0.80, leak=0.12), row("b04", 0.60, leak=0.02)],
            "go",
            "backbone:b04",
        ),  # lower F1 but passes
        ([row("b08", 0.80, leak=0.12)], "go_conditional", "backbone:b08"),
        ([row("b08", 0.50)], "go_conditional", "backbone:b08"),
        ([row("b01", 0.30), row("b02", 0.39)], "nogo", "backbone:b02"),
        ([row("b01", 0.30), row("b02", 0.42)], "inconclusive", "backbone:b02"),
    ],
)
def test_rules(rows, code, best):
    d = decide(rows, CFG)
    assert d.code == code and d.best == best
    assert d.rationale.endswith(".") and best in d.rationale


def test_boundaries():
    assert row_status(row("x", 0.55, leak=0.07, drop=0.0999), CFG) == "go"
    assert row_status(row("x", 0.55, leak=0.0701), CFG) == "go_conditional"
    assert row_status(row("x", 0.55, drop=0.10), CFG) == "go_conditional"  # the drop must stay below 0.10
    assert row_status(row("x", 0.45), CFG) == "go_conditional"
    assert row_status(row("x", 0.40), CFG) == "inconclusive"
    assert row_status(row("x", 0.3999), CFG) == "nogo"


def test_custom_thresholds_from_config():
    strict = DecisionConfig(min_f1_go=0.60, leakage_margin_pp=5)
    assert decide([row("x", 0.58, leak=0.03)], strict).code == "go_conditional"
    assert decide([row("x", 0.62, leak=0.06)], strict).code == "go_conditional"
    assert decide([row("x", 0.62, leak=0.04)], strict).code == "go"


def test_rationale_names_what_failed_and_what_to_do():
    d = decide([row("b08", 0.70, drop=0.2)], CFG)
    assert "text drop 0.20 >= 0.10" in d.rationale and "varied texts" in d.rationale
    d = decide([row("b08", 0.70, leak=0.2)], CFG)
    assert "leakage 0.20 > 0.07" in d.rationale and "adversarial" in d.rationale


def test_unmeasured_metrics_are_said_so():
    d = decide([row("b08", 0.70, drop=math.nan, leak=math.nan)], CFG)
    assert d.code == "go"
    assert "text drop n/a" in d.rationale
    assert any("Text drop not measured" in n for n in d.notes)
    assert any("Leakage not measured" in n for n in d.notes)


def test_baselines_are_reported_not_chosen():
    rows = [row("b08", 0.60), row("logmel", 0.90, baseline=True, rep="frontend")]
    d = decide(rows, CFG)
    assert d.best == "backbone:b08"
    assert any("baseline frontend:logmel" in n for n in d.notes)
    only_baseline = decide([row("logmel", 0.9, baseline=True, rep="frontend")], CFG)
    assert only_baseline.best == "frontend:logmel"  # nothing else was probed


def test_small_sets_and_empty_tables():
    d = decide([row("b", 0.7)], CFG, ["only 2 target classes (recommended at least 3)"])
    assert any("below the recommended size" in n for n in d.notes)
    empty = decide([row("b", math.nan)], CFG)
    assert empty.code == "nogo" and empty.best is None
    assert decide([row("b", 0.7)], CFG).to_dict()["verdict"] == "GO (strong)"
