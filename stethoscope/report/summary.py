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
from stethoscope.report.model import ReportContent
from stethoscope.run import Run, load_run

VERDICT_STYLE = {"healthy": "bold green", "warning": "bold yellow", "critical": "bold red"}


def findings_table(run: Run, title: str | None = None) -> Table:
    """The findings as a rich table, incident by incident (a consequence under its root, marked ``↳``)."""
    table = Table(title=title, show_lines=False, expand=False)
    for col in ("#", "severity", "code", "target", "value", "threshold", "when"):
        table.add_column(col, overflow="fold")
    for f in build(run, findings_only=True).findings:
        style = SEVERITY_STYLE.get(f.severity, "")
        table.add_row(
            "↳" if f.consequence else str(f.incident), f"[{style}]{f.severity}[/]", escape(f.code),
            escape(f.target), f.value, f.threshold, f.when,
        )
    return table


def print_incidents(content: ReportContent, console: Console, max_consequences: int = 5) -> None:
    """Each incident as a block: the root (code, target, value vs threshold, when), its one-sentence message
    and hint, then its consequences folded to one line each."""
    for root, consequences in content.by_incident():
        style = SEVERITY_STYLE.get(root.severity, "")
        console.print(
            f"[{style}]{root.severity}[/] [bold]{escape(root.code)}[/] on [bold]{escape(root.target)}[/] · value "
            f"{escape(root.value)} vs threshold {escape(root.threshold)} · {escape(root.when)}",
            soft_wrap=True,
        )
        if root.message:
            console.print(f"  {escape(root.message)}", soft_wrap=True)
        if root.hint:
            console.print(f"  [bold]fix:[/] {escape(root.hint)}", soft_wrap=True)
        if consequences:
            n = len(consequences)
            console.print(f"  + {n} finding{'s' if n != 1 else ''} follow{'s' if n == 1 else ''} from it "
                          "(consequences: fix the cause first):", soft_wrap=True)
            for f in consequences[:max_consequences]:
                console.print(f"    ↳ {f.severity} {escape(f.code)} on {escape(f.target)} · value {escape(f.value)}",
                              soft_wrap=True)
            if n > max_consequences:
                console.print(f"    ↳ … and {n - max_consequences} more (stethoscope findings --json)", soft_wrap=True)


def print_summary(run_dir: str | Path, console: Console | None = None) -> None:
    """The end-of-run summary: verdict (naming the cause), the incidents, where the files are."""
    console = console or get_console()
    run = load_run(run_dir)
    content = build(run, findings_only=True)
    style = VERDICT_STYLE.get(content.verdict, "bold")
    console.print(f"[{style}]stethoscope verdict: {escape(content.verdict_words)}[/]", soft_wrap=True)
    if content.cause:
        console.print(f"cause: {escape(content.cause)}", soft_wrap=True)
    if run.findings:
        print_incidents(content, console)
    console.print(f"run directory: {escape(str(run.path))}", soft_wrap=True)
    for name in ("report.html", "report.md"):
        if (run.path / name).is_file():
            console.print(f"report: {escape(str(run.path / name))}", soft_wrap=True)
