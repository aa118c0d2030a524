"""The hints table: the docs page is generated from it, every finding code has its hints there, no producer
writes hint text of its own, and the clauses are worded for the target."""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

import pytest
import torch
import yaml

from stethoscope.rules import hints as H
from stethoscope.rules.hints_doc import markdown
from stethoscope.rules.model_info import ModelInfo

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "stethoscope"


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _all_params(entry: dict) -> dict:
    """A value for every parameter and flag the case's clauses name (selectors excluded)."""
    params: dict = {"module": "encoder.layer.0.fc", "info": None, "lr": 0.05, "typical": 2.0}
    for clause in entry["says"]:
        if isinstance(clause, dict):
            params[clause["if"]] = True
            clause = clause["says"]
        for f in _fields(clause):
            if f not in H.SELECTORS:
                params.setdefault(f, f"<{f}>")
    return params


# ---------------------------------------------------------------------------------------------- the table
def test_docs_page_is_generated_from_the_table():
    page = (ROOT / "docs" / "hints.md").read_text(encoding="utf-8")
    assert page == markdown(), "docs/hints.md is stale: run `python -m stethoscope.rules.hints_doc > docs/hints.md`"


def test_every_documented_code_has_hints_and_every_hinted_code_is_documented():
    findings = (ROOT / "docs" / "findings.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### ([a-z]+\.[a-z_.]+)$", findings, flags=re.M))
    documented |= set(re.findall(r"^\| `(preflight\.[a-z_]+)` \|", findings, flags=re.M))
    hinted = set(H.table()["codes"])
    assert hinted - documented == set(), "codes with hints but no entry in docs/findings.md"
    assert documented - hinted == set(), "documented codes without hints in stethoscope/rules/hints.yaml"


def test_every_case_renders_every_clause_when_everything_is_known():
    for code, cases in H.table()["codes"].items():
        for case, entry in cases.items():
            assert entry.get("when"), f"{code} / {case} says nothing about when it applies"
            out = H.clauses(code, case, **_all_params(entry))
            assert len(out) == len(entry["says"]), (code, case)
            for text in out:
                assert not re.search(r"\{[a-z_]+\}", text), (code, case, text)  # no placeholder left
                assert len(text) > 15, (code, case, text)


def test_a_malformed_clause_is_refused_with_its_code_and_case():
    data = yaml.safe_load("codes:\n  grad.x:\n    default:\n      says:\n        - Act now: it helps\n")
    with pytest.raises(ValueError, match=r"grad\.x / default.*quote a clause"):
        H.validate(data)


def test_a_parameter_the_caller_forgot_is_an_error_naming_it():
    with pytest.raises(KeyError, match="needs the parameter 'name'"):
        H.hint("update.ratio", "not_in_optimizer")
    with pytest.raises(KeyError, match=r"no hint for 'update\.ratio' case 'sideways'"):
        H.hint("update.ratio", "sideways")


# ---------------------------------------------------------------------------------------------- one place
def _literal_text(node: ast.AST | None) -> bool:
    """A hint written in place: a non-empty string, an f-string, or text glued with +."""
    if isinstance(node, ast.Lambda):
        return _literal_text(node.body)
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value != ""
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _literal_text(node.left) or _literal_text(node.right)
    return False


# the hint's position among a producer call's positional arguments
HINT_POSITION = {"propose": 6, "report": 4}  # propose(target, severity, value, threshold, step, message, hint); preflight's report(code, target, severity, message, hint)


def test_no_producer_writes_hint_text_outside_the_table():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("hints.py", "hints_doc.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            hint_join = name == "join" and isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "H"
            if hint_join and any(_literal_text(a) for a in node.args):
                offenders.append(f"{where}: H.join of text written in place")
            for kw in node.keywords:
                if kw.arg == "hint" and _literal_text(kw.value):
                    offenders.append(f"{where}: hint= written in place")
            pos = HINT_POSITION.get(name)
            if pos is not None and len(node.args) > pos and _literal_text(node.args[pos]):
                offenders.append(f"{where}: {name}(...) hint written in place")
    assert offenders == []


# ---------------------------------------------------------------------------------------------- worded for the target


def test_a_normalisation_layer_is_told_about_its_gain_not_to_get_a_layernorm():
    info = ModelInfo.inspect(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
    on_norm = H.hint("act.saturation", module="1", info=info, lr=None)
    assert "`1` is itself a normalisation layer" in on_norm
    assert "put a LayerNorm in front" not in on_norm
    assert "Xavier" not in on_norm  # a norm has no weight matrix to re-initialise
    assert "check the scale of the features entering" not in on_norm
    on_linear = H.hint("act.saturation", module="0", info=info, lr=None)
    assert on_linear.startswith("Put a LayerNorm in front of `0`")
    assert "re-initialise `0` with Xavier" in on_linear


def test_the_learning_rate_clause_is_concrete_for_the_optimizer_family():
    model = torch.nn.Linear(4, 4)
    adam = ModelInfo.inspect(model, torch.optim.AdamW(model.parameters(), lr=0.05))
    sgd = ModelInfo.inspect(model, torch.optim.SGD(model.parameters(), lr=0.05))
    assert "far above the usual range (1e-3 or lower for Adam/AdamW" in H.hint("grad.dead_trend", module="m",
                                                                                lr=0.05, info=adam)
    assert "from 0.05 to about 0.0167" in H.hint("grad.dead_trend", module="m", lr=0.05, info=sgd)
    assert "a third of it is a good first try" in H.hint("grad.dead_trend", module="m", lr=None, info=None)


def test_flags_and_unknown_values_leave_clauses_out():
    kw = dict(after_epoch=False, grew=False, fragmented=False)
    eager = H.clauses("memory.oom", eager=True, not_eager=False, **kw)
    fused = H.clauses("memory.oom", eager=False, not_eager=True, **kw)
    assert any("this model uses eager attention" in c for c in eager)
    assert not any("this model uses eager attention" in c for c in fused)
    assert len(eager) == len(fused) == 5
    # no module fed the dead units: no module-specific clause at all
    text = H.hint("act.dead_features", module=None, info=None, lr=None, relu=False)
    assert "`None`" not in text and "LayerNorm" not in text and "leaky" not in text
