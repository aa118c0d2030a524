"""The console twin of the report: the findings table of ``stethoscope findings`` and the end-of-run summary.

Built from the same :mod:`~stethoscope.report.content` as the HTML page and ``report.md`` (verdict words,
finding rows, value formatting), so the three say the same thing.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stethoscope.console import SEVERITY_STYLE, get_console
from stethoscope.report.content import build
from stethoscope.run import Run, load_run

VERDICT_STYLE = {"healthy": "bold green", "warning": "bold yellow", "critical": "bold red"}


def findings_table(run: Run, title: str | None = None) -> Table:
    """The findings as a rich table, most severe first (the console twin of the report's table)."""
    table = Table(title=title, show_lines=False, expand=False)
    for col in ("severity", "code", "target", "value", "threshold", "when"):
        table.add_column(col, overflow="fold")
    for f in build(run, findings_only=True).findings:
        style = SEVERITY_STYLE.get(f.severity, "")
        table.add_row(
            f"[{style}]{f.severity}[/]", escape(f.code), escape(f.target), f.value, f.threshold, f.when
        )
    return table


def print_summary(run_dir: str | Path, console: Console | None = None) -> None:
    """The end-of-run summary: verdict, findings table, where the files are."""
    console = console or get_console()
    run = load_run(run_dir)
    content = build(run, findings_only=True)
    style = VERDICT_STYLE.get(content.verdict, "bold")
    console.print(f"[{style}]stethoscope verdict: {content.verdict_words}[/]")
    if run.findings:
        console.print(findings_table(run))
    console.print(f"run directory: {escape(str(run.path))}", soft_wrap=True)
    for name in ("report.html", "report.md"):
        if (run.path / name).is_file():
            console.print(f"report: {escape(str(run.path / name))}", soft_wrap=True)
