"""The command line (issue 2, item 10): findings (--json, --fail-on), report, bad input, ``python -m``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from stethoscope import cli
from stethoscope import rundir as rd


def run_cli(monkeypatch, capsys, console_text, *args: str) -> tuple[int, str]:
    """Run ``stethoscope ARGS`` in this process; returns (exit code, everything printed)."""
    monkeypatch.setattr(sys, "argv", ["stethoscope", *map(str, args)])
    start = len(console_text.getvalue())
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr().out + console_text.getvalue()[start:]
    return code, out


def _event(fid, code, severity, step, event="open", value=0.5, target="h.0.mlp"):
    return {
        "schema_version": rd.SCHEMA_VERSION,
        "id": fid,
        "event": event,
        "step": step,
        "code": code,
        "severity": severity,
        "target": target,
        "value": value,
        "threshold": 0.3,
        "message": f"{code} msg",
        "hint": f"{code} hint",
        "rank": None,
        "data": {},
        "time": time.time(),
    }


def craft_run(path, *events):
    """A run directory written by hand: meta.json, one metrics line, and the given finding events."""
    path.mkdir(parents=True)
    rd.write_json_atomic(
        path / rd.META,
        {
            "schema_version": rd.SCHEMA_VERSION,
            "status": "finished",
            "last_step": 3,
            "model": {"class": "Tiny", "parameters": 10},
        },
    )
    (path / rd.METRICS).write_text(
        json.dumps({"schema_version": 1, "step": 3, "kind": "scalar", "name": "loss", "value": 1.25}) + "\n"
    )
    (path / rd.FINDINGS).write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


@pytest.fixture
def warning_run(tmp_path):
    return craft_run(
        tmp_path / "warn",
        _event("grad.zero_fraction:h.0.mlp", "grad.zero_fraction", "warning", 2),
        _event("grad.zero_fraction:h.0.mlp", "grad.zero_fraction", "warning", 3, event="update", value=0.7),
        _event("act.saturation:h.1", "act.saturation", "info", 1, target="h.1"),
    )


def test_findings_json(monkeypatch, capsys, console_text, warning_run):
    code, out = run_cli(monkeypatch, capsys, console_text, "findings", warning_run, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "finished" and doc["verdict"]["status"] == "warning"
    findings = doc["findings"]
    assert [f["code"] for f in findings] == ["grad.zero_fraction", "act.saturation"]  # most severe first
    first = findings[0]
    assert first["first_step"] == 2 and first["worst_value"] == 0.7 and first["events"] == 2 and first["open"]


def test_findings_table(monkeypatch, capsys, console_text, warning_run):
    code, out = run_cli(monkeypatch, capsys, console_text, "findings", warning_run)
    assert code == 0
    assert "verdict: warning" in out and "grad.zero_fraction" in out and "h.0.mlp" in out


@pytest.mark.parametrize(("level", "expected"), [("warning", 1), ("critical", 0)])
def test_fail_on_with_a_warning(monkeypatch, capsys, console_text, warning_run, level, expected):
    code, _ = run_cli(monkeypatch, capsys, console_text, "findings", warning_run, "--fail-on", level)
    assert code == expected


def test_fail_on_with_a_critical_and_with_nothing(monkeypatch, capsys, console_text, tmp_path):
    crit = craft_run(
        tmp_path / "crit", _event("grad.nonfinite:w", "grad.nonfinite", "critical", 5, target="w")
    )
    for level in ("warning", "critical"):
        assert run_cli(monkeypatch, capsys, console_text, "findings", crit, "--fail-on", level)[0] == 1
    clean = craft_run(tmp_path / "clean")
    for level in ("warning", "critical"):
        assert run_cli(monkeypatch, capsys, console_text, "findings", clean, "--fail-on", level)[0] == 0
    code, out = run_cli(monkeypatch, capsys, console_text, "findings", clean)
    assert code == 0 and "no findings" in out


def test_a_cleared_finding_still_counts_for_fail_on(monkeypatch, capsys, console_text, tmp_path):
    path = craft_run(
        tmp_path / "cleared",
        _event("x:a", "grad.zero_fraction", "warning", 1),
        _event("x:a", "grad.zero_fraction", "warning", 4, event="close"),
    )
    code, out = run_cli(monkeypatch, capsys, console_text, "findings", path, "--json", "--fail-on", "warning")
    assert code == 1
    assert json.loads(out)["findings"][0]["cleared_step"] == 4


def test_bad_fail_on_level_is_a_one_line_error(monkeypatch, capsys, console_text, warning_run):
    code, out = run_cli(monkeypatch, capsys, console_text, "findings", warning_run, "--fail-on", "info")
    assert code == 2 and "--fail-on" in out and len(out.strip().splitlines()) == 1


def test_report_writes_report_md(monkeypatch, capsys, console_text, warning_run):
    code, out = run_cli(monkeypatch, capsys, console_text, "report", warning_run)
    assert code == 0
    text = (warning_run / "report.md").read_text()
    assert "grad.zero_fraction" in text and "grad.zero_fraction hint" in text and "warning" in text
    assert "report.md" in out


@pytest.mark.parametrize("command", ["findings", "report"])
def test_a_bad_run_dir_is_exit_code_2_with_one_line(monkeypatch, capsys, console_text, tmp_path, command):
    not_a_run = tmp_path / "some-folder-with-a-rather-long-name-so-that-a-narrow-console-would-wrap-it"
    not_a_run.mkdir()
    for bad in (tmp_path / "missing[1]", not_a_run):
        code, out = run_cli(monkeypatch, capsys, console_text, command, bad)
        assert code == 2, out
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), out
        assert str(bad) in lines[0]  # the path as given, brackets and all
        assert "Traceback" not in out


def _subprocess(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "STETHOSCOPE_DISABLE"} | {"COLUMNS": "60"}
    return subprocess.run(
        [sys.executable, "-m", "stethoscope", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def test_python_m_stethoscope_help_and_a_bad_run_dir(tmp_path):
    proc = _subprocess("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("findings", "report", "demo"):
        assert command in proc.stdout
    proc = _subprocess("findings", tmp_path / "a-run-directory-that-does-not-exist-anywhere-at-all")
    assert proc.returncode == 2
    assert len(proc.stdout.strip().splitlines()) == 1 and "does-not-exist-anywhere-at-all" in proc.stdout
    assert "Traceback" not in proc.stderr
