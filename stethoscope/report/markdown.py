"""``report.md``: the Markdown twin, readable as plain text; its figures sit beside it in ``report_files/``."""

from __future__ import annotations

from stethoscope.report.model import Plot, ReportContent, Section, Table, replay_line
from stethoscope.report.plots import Image

FILES_DIR = "report_files"


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(t: Table) -> list[str]:
    lines = []
    if t.caption:
        lines += [f"{t.caption}:", ""]
    lines.append("| " + " | ".join(t.columns) + " |")
    lines.append("|" + "---|" * len(t.columns))
    for row in t.rows:
        cells = [f"`{_esc(c)}`" if i in t.code_columns else _esc(c) for i, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if t.note:
        lines += ["", f"*{t.note}*"]
    lines.append("")
    return lines


def image_name(plot: Plot, image: Image) -> str:
    return f"{FILES_DIR}/{plot.id}.{image.ext}"


def _figure(plot: Plot, images: dict) -> list[str]:
    image = images.get(plot.id)
    if not isinstance(image, Image):
        return [f"*{plot.title}: this plot could not be drawn ({image!r}).*", ""]
    lines = [f"![{plot.title}]({image_name(plot, image)})", ""]
    if plot.caption and plot.caption != plot.title:
        lines += [f"*{plot.caption}*", ""]
    return lines


def _section(s: Section, images: dict) -> list[str]:
    lines = [f"## {s.title}", ""]
    if s.intro:
        lines += [s.intro, ""]
    for p in s.plots:
        lines += _figure(p, images)
    for t in s.tables:
        lines += _table(t)
    for link in s.links:
        lines += [f"- [{link.label}]({link.path})"]
        if link.excerpt:
            lines += ["", "  ```text", *[f"  {ln}" for ln in link.excerpt.splitlines()], "  ```", ""]
    if s.links:
        lines.append("")
    for note in s.notes:
        lines += [f"*{note}*", ""]
    return lines


def render_markdown_content(content: ReportContent, images: dict | None = None) -> str:
    """The Markdown text; ``images`` maps plot ids to rendered images (None: no figures, tables only)."""
    c = content
    lines = [f"# {c.title}", "", f"**Verdict: {c.verdict_words}** ({c.counts_text})", ""]
    if c.cause:
        lines += [f"**Cause:** {c.cause}", ""]
    lines += ["## Run", "", "| | |", "|---|---|", *[f"| {k} | {_esc(v)} |" for k, v in c.facts], ""]
    lines += ["## Findings", ""]
    if not c.findings:
        lines += ["No findings: every rule stayed silent.", ""]
    else:
        lines += ["| incident | severity | code | target | value | threshold | when |",
                  "|---|---|---|---|---|---|---|"]
        for f in c.table_rows():
            if isinstance(f, tuple):
                lines.append(f"| ↳ | | + {f[1]} more consequences | see incident {f[0]} below | | | |")
                continue
            mark = "↳ consequence" if f.consequence else str(f.incident)
            lines.append(f"| {mark} | {f.severity} | `{f.code}` | `{_esc(f.target)}` | {f.value} | {f.threshold} "
                         f"| {f.when} |")
        lines.append("")
        for root, consequences in c.by_incident():
            lines += [f"### Incident {root.incident} — {root.severity}: `{root.code}` on `{root.target}`", "",
                      root.message, "", f"Value {root.value} against the threshold {root.threshold}; {root.when}.", ""]
            if root.hint:
                lines += [f"*What usually fixes it:* {root.hint}", ""]
            if root.replay:
                lines += [replay_line(root), ""]
            if consequences:
                n = len(consequences)
                lines += [f"**{n} finding{'s' if n != 1 else ''} follow{'s' if n == 1 else ''} from it** "
                          "(they opened while it was open: fix the cause first):", ""]
                lines += [f"- {f.severity} `{f.code}` on `{_esc(f.target)}`: value {f.value}, {f.when}"
                          for f in consequences]
                lines.append("")
    for s in c.sections:
        if images is None:
            s = Section(s.id, s.title, s.intro, [], s.tables, s.links, s.notes)
        lines += _section(s, images or {})
    lines += [
        "---",
        "Written by stethoscope. `stethoscope findings RUN_DIR` lists the findings; "
        "`docs/findings.md` explains every code. `report.html` is the same report as one page.",
    ]
    return "\n".join(lines) + "\n"
