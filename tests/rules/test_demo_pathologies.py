"""`stethoscope demo --pathology NAME`: each injected problem produces its critical finding on the right
target, and the healthy demo produces no warning or critical finding.

The expected targets are the demo's own (``Pathology.expected`` / ``Pathology.target`` in
``stethoscope/demo/pathologies.py``); short runs (``--steps``) keep this fast. The mid-run onsets
(``exploding``, ``nan``: ``steps // 2``) fall inside the default sampling warm-up; ``exploding`` gets enough
steps after its onset for the spike to be seen to last (critical after 5 sampled steps in a row).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import stethoscope as st
from stethoscope.cli import app
from stethoscope.demo.pathologies import PATHOLOGIES, get_pathology
from tests.rules._helpers import alarms, describe

STEPS = {"none": 16, "dead-relu": 4, "vanishing": 4, "unused-param": 4, "nan": 8, "exploding": 12}


def run_cli(tmp_path, pathology: str) -> st.Run:
    out = tmp_path / pathology
    steps = str(STEPS[pathology])
    result = CliRunner().invoke(
        app, ["demo", "--pathology", pathology, "--steps", steps, "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return st.load_run(out)


def under(target: str | None, place: str) -> bool:
    """``target`` is ``place`` or a module/parameter inside it ("" is the root: only "" itself)."""
    if target is None:
        return False
    if place == "":
        return target == ""
    return target == place or target.startswith(place + ".")


def test_healthy_demo_is_silent(tmp_path):
    run = run_cli(tmp_path, "none")
    assert not alarms(run), describe(run)
    assert run.meta["verdict"]["status"] == "healthy"


@pytest.mark.parametrize("name", [n for n in PATHOLOGIES if n != "none"])
def test_pathology_produces_its_critical_finding(tmp_path, name):
    path = get_pathology(name)
    run = run_cli(tmp_path, name)
    critical = [
        f
        for f in run.findings
        if f.severity == "critical" and f.code in path.expected
        and any(under(t, path.target) for t in f.members or [f.target])
    ]
    assert critical, f"no critical {list(path.expected)} on {path.target!r}:\n{describe(run)}"
    for code, targets in path.expected.items():
        got = {t for f in run.findings if f.code == code and f.severity in ("warning", "critical")
               for t in f.members or [f.target]}  # an aggregated finding stands for its members
        assert set(targets) <= got, f"{code}: expected {targets}, got {got}\n{describe(run)}"
    first = min(f.first_step for f in critical)
    assert first >= path.onset(STEPS[name])  # nothing is "found" before it exists
    assert run.meta["verdict"]["status"] == "critical"
