"""``write_report``: report.html (self-contained) and report.md from a real run; the CLI and Monitor.close()."""

from __future__ import annotations

import io
import re
import shutil

from rich.console import Console

import stethoscope as st
from stethoscope.cli import app
from stethoscope.console import set_console
from stethoscope.report import build, findings_table, print_summary, write_report


def test_close_writes_both_files_and_the_page_is_self_contained(gpt2_run):
    html = (gpt2_run / "report.html").read_text()
    md = (gpt2_run / "report.md").read_text()
    # no network: every src/href is a data: URI, an in-page anchor or a relative file
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) or "://" not in r for r in refs), refs
    assert "<script" not in html and "@import" not in html and "url(" not in html
    for plot_id in ("training", "grad-norm", "grad-zero", "activations", "update-ratio"):
        assert f'data-plot="{plot_id}"' in html and f"report_files/{plot_id}.png" in md
        assert (gpt2_run / "report_files" / f"{plot_id}.png").stat().st_size > 1000
    # sections without data are absent
    for missing in ("dumps", "preflight"):
        assert f'<section id="{missing}"' not in html
    # the memory monitor is on by default: its RSS curve is drawn
    assert '<section id="memory"' in html and 'data-plot="memory"' in html
    # the monitor captured the attention: per-head entropy / sink share over layers x heads
    assert '<section id="attention"' in html and 'data-plot="attention"' in html
    # the monitor's per-module profile: slowest modules by self time
    assert ('<section id="timing"' in html) == (gpt2_run / "profile.json").is_file()
    assert len(html) < 2_000_000


def test_overview_and_findings_most_severe_first(gpt2_run):
    html = (gpt2_run / "report.html").read_text()
    md = (gpt2_run / "report.md").read_text()
    assert 'data-verdict="critical"' in html and "**Verdict: critical" in md
    assert "GPT2LMHeadModel" in html and "last step 11; 10 sampled step(s)" in html and " s, started" in html
    crit, warn = html.index("numerics.nonfinite"), html.index("grad.zero_fraction")
    assert crit < warn  # most severe first
    assert "transformer.h.1.mlp.c_fc.weight" in html and "cleared" in html
    assert "grad.zero_fraction hint: do the fix" in html and "grad.zero_fraction hint: do the fix" in md
    assert "step 3 → cleared at step 9" in md and "step 7 → still open" in md
    assert "0.31" in md and "0.2" in md


def test_console_twin_says_the_same(gpt2_run):
    run = st.load_run(gpt2_run)
    content = build(run)
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    console.print(findings_table(run))
    print_summary(gpt2_run, console=console)
    text = buf.getvalue()
    for f in content.findings:
        assert f.code in text and f.target in text and f.when in text
    assert content.verdict_words in text
    assert "report.html" in text and "report.md" in text


def test_cli_report_says_where_both_files_are(gpt2_run, tmp_path):
    from typer.testing import CliRunner

    copy = tmp_path / "copy"
    shutil.copytree(gpt2_run, copy)
    (copy / "report.html").unlink()
    (copy / "report_files" / "stale.png").write_bytes(b"x")
    buf = io.StringIO()
    set_console(Console(file=buf, width=300, color_system=None))
    try:
        result = CliRunner().invoke(app, ["report", str(copy)])
    finally:
        set_console(None)
    assert result.exit_code == 0, result.output
    out = buf.getvalue()
    assert str(copy / "report.html") in out and str(copy / "report.md") in out
    assert (copy / "report.html").is_file()
    assert not (copy / "report_files" / "stale.png").exists()  # figures of an older report are removed


def test_a_run_with_nothing_recorded_still_gets_a_report(tmp_path):
    from tests.report.conftest import write_run

    path = write_run(tmp_path / "empty", [])
    md_path = write_report(path)
    html = (path / "report.html").read_text()
    assert "No findings" in html and "healthy" in html and "<img" not in html
    assert "Verdict: healthy" in md_path.read_text()
    assert not (path / "report_files").exists()


def test_without_plots_the_pages_keep_their_tables(gpt2_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(gpt2_run, copy)
    write_report(copy, plots=False)
    html = (copy / "report.html").read_text()
    assert "<img" not in html and "Largest gradient norms" in html and "numerics.nonfinite" in html
    assert not (copy / "report_files").exists() or not any((copy / "report_files").iterdir())
