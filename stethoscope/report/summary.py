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
from stethoscope.report.model import ReportContent, replay_line
from stethoscope.run import Run, load_run

VERDICT_STYLE = {"healthy": "bold green", "warning": "bold yellow", "critical": "bold red"}


def findings_table(run: Run, title: str | None = None, width: int | None = None) -> Table:
    """The findings as a rich table, incident by incident (a consequence under its root, marked ``↳``).

    Narrow enough for 80 columns, and nothing is folded mid-word ("act.dead_feat/ures"): each finding's code
    and target share a cell on two lines, every line stays whole, "steps" is short (``0 → open``, ``3 → 12``:
    the first step and the step it cleared), and only a target too long for the line (``width``, default the
    console's) is cut, with "…" (``stethoscope findings`` prints it whole).
    """
    from rich import box
    from rich.cells import cell_len

    columns = ("#", "severity", "finding", "value", "threshold", "steps")
    rows = [
        ("↳" if f.consequence else str(f.incident), f.severity, (f.code, f.target), f.value, f.threshold,
         f"{f.started} → {'open' if f.cleared == 'still open' else f.cleared}")
        for f in build(run, findings_only=True).findings
    ]
    widths = [max([cell_len(col)] + [max(map(cell_len, r[i])) if i == 2 else cell_len(r[i]) for r in rows])
              for i, col in enumerate(columns)]
    width = width or get_console().width
    # SIMPLE_HEAD: a space of padding either side of a cell, a blank rule between columns and at both edges
    room = width - (sum(widths) - widths[2]) - (3 * len(columns) + 1)
    table = Table(title=title, show_lines=False, expand=False, box=box.SIMPLE_HEAD)
    for i, col in enumerate(columns):
        table.add_column(col, no_wrap=True, overflow="ellipsis",
                         max_width=max(len(col), room) if i == 2 else None, min_width=None if i == 2 else widths[i])
    for r in rows:
        style = SEVERITY_STYLE.get(r[1], "")
        table.add_row(r[0], f"[{style}]{r[1]}[/]", f"{escape(r[2][0])}\n[dim]{escape(r[2][1])}[/]",
                      *(escape(c) for c in r[3:]))
    return table


def print_incidents(content: ReportContent, console: Console, max_consequences: int = 5,
                    run_dir: str = "RUN_DIR") -> None:
    """Each incident as a block: the root (code, target, value vs threshold, when), its one-sentence message
    and hint, how to replay it when its step was saved, then its consequences folded to one line each."""
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
        if root.replay:
            console.print(f"  {escape(replay_line(root, run_dir))}", soft_wrap=True)
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
        print_incidents(content, console, run_dir=str(run.path))
    console.print(f"run directory: {escape(str(run.path))}", soft_wrap=True)
    for name in ("report.html", "report.md"):
        if (run.path / name).is_file():
            console.print(f"report: {escape(str(run.path / name))}", soft_wrap=True)
