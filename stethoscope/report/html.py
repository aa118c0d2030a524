"""``report.html``: one self-contained page — inline CSS, plots as ``data:`` URIs, no script, no network.

Links to hang/crash dumps and attention logs are relative, so they open from the run directory on disk.
"""

from __future__ import annotations

import base64
from html import escape

from stethoscope.report.model import FindingRow, Plot, ReportContent, Section, Table, replay_line
from stethoscope.report.plots import Image

_CSS = """
:root { --fg:#1d232b; --muted:#5b6573; --line:#d9dee5; --bg:#ffffff; --soft:#f5f7fa;
        --crit:#b3261e; --warn:#9a6700; --info:#0b6bcb; --ok:#1a7f37; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--fg); background:var(--bg); }
main { max-width: 1060px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 19px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
code, pre, .mono { font-family: ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size: 13px; }
nav { font-size: 13px; color: var(--muted); margin: 4px 0 16px; }
nav a { margin-right: 12px; }
a { color: var(--info); }
.verdict { display:flex; align-items:center; gap:14px; padding: 12px 16px; border-radius: 8px;
           border: 1px solid var(--line); background: var(--soft); margin: 8px 0 16px; }
.verdict .badge { font-weight: 700; text-transform: uppercase; letter-spacing: .04em; color: #fff;
                  padding: 4px 10px; border-radius: 5px; }
.badge.healthy { background: var(--ok); } .badge.warning { background: var(--warn); }
.badge.critical { background: var(--crit); } .badge.info { background: var(--info); }
table { border-collapse: collapse; width: 100%; margin: 6px 0 4px; font-size: 13.5px; }
th, td { text-align: left; vertical-align: top; padding: 5px 8px; border-bottom: 1px solid var(--line); }
th { background: var(--soft); font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.mono { word-break: break-all; }
table.facts th { width: 120px; background: none; color: var(--muted); font-weight: 500; }
.sev { font-weight: 700; } .sev.critical { color: var(--crit); } .sev.warning { color: var(--warn); }
.sev.info { color: var(--info); }
.finding { border-left: 4px solid var(--line); padding: 4px 0 4px 12px; margin: 12px 0; }
.finding.critical { border-color: var(--crit); } .finding.warning { border-color: var(--warn); }
.finding.info { border-color: var(--info); }
.finding p { margin: 4px 0; }
.incident { margin: 18px 0; } .incident details { margin-left: 24px; }
.incident summary { cursor: pointer; color: var(--muted, #666); }
tr.consequence td { opacity: 0.75; } tr.consequence td:first-child { text-align: right; }
.hint { color: var(--fg); background: var(--soft); padding: 6px 10px; border-radius: 5px; }
figure { margin: 14px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption, .caption, .note, .intro { color: var(--muted); font-size: 13px; }
.caption { margin: 14px 0 0; font-weight: 600; color: var(--fg); }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 5px; padding: 8px 10px;
      overflow-x: auto; max-height: 420px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 10px; }
.error { color: var(--crit); }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; }
"""


def _data_uri(image: Image) -> str:
    return f"data:{image.mime};base64," + base64.b64encode(image.data).decode("ascii")


def _table(t: Table, css: str = "") -> str:
    parts = []
    if t.caption:
        parts.append(f'<p class="caption">{escape(t.caption)}</p>')
    parts.append(
        f'<table class="{css}"><thead><tr>'
        + "".join(f"<th>{escape(c)}</th>" for c in t.columns)
        + "</tr></thead><tbody>"
    )
    for row in t.rows:
        cells = []
        for i, cell in enumerate(row):
            cls = "mono" if i in t.code_columns else "num" if i > 0 else ""
            cells.append(f'<td class="{cls}">{escape(str(cell))}</td>')
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    if t.note:
        parts.append(f'<p class="note">{escape(t.note)}</p>')
    return "\n".join(parts)


def _figure(plot: Plot, images: dict) -> str:
    image = images.get(plot.id)
    if isinstance(image, Image):
        alt = escape(plot.title)
        body = f'<img src="{_data_uri(image)}" alt="{alt}" data-plot="{escape(plot.id)}">'
    else:
        body = f'<p class="error">This plot could not be drawn: {escape(repr(image))}</p>'
    caption = (
        f"<figcaption><b>{escape(plot.title)}</b>"
        + (f" — {escape(plot.caption)}" if plot.caption and plot.caption != plot.title else "")
        + "</figcaption>"
    )
    return f'<figure id="plot-{escape(plot.id)}">{body}{caption}</figure>'


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code> (messages and hints use backticks for names)."""
    out, parts = [], escape(text).split("`")
    for i, part in enumerate(parts):
        out.append(f"<code>{part}</code>" if i % 2 and i < len(parts) - 1 else part)
    if len(parts) % 2 == 0:  # an unpaired backtick: put it back
        out[-1] = "`" + out[-1]
    return "".join(out)


def _section(s: Section, images: dict) -> str:
    parts = [f'<section id="{escape(s.id)}"><h2>{escape(s.title)}</h2>']
    if s.intro:
        parts.append(f'<p class="intro">{_inline(s.intro)}</p>')
    gallery = [p for p in s.plots if p.kind == "image"]
    for p in s.plots:
        if p.kind != "image":
            parts.append(_figure(p, images))
    if gallery:
        parts.append('<div class="gallery">' + "".join(_figure(p, images) for p in gallery) + "</div>")
    for t in s.tables:
        parts.append(_table(t))
    for link in s.links:
        parts.append(f'<h3><a href="{escape(link.path)}">{escape(link.label)}</a></h3>')
        if link.excerpt:
            parts.append(f"<pre>{escape(link.excerpt)}</pre>")
    for note in s.notes:
        parts.append(f'<p class="note">{_inline(note)}</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _finding_card(f: FindingRow, i: int, prefix: str) -> str:
    return (
        f'<div class="finding {escape(f.severity)}" id="finding-{i}">'
        f'<h3>{escape(prefix)}<span class="sev {escape(f.severity)}">{escape(f.severity)}</span> '
        f"<code>{escape(f.code)}</code> on <code>{escape(f.target)}</code></h3>"
        f"<p>{_inline(f.message)}</p>"
        f'<p class="note">value {escape(f.value)} vs threshold {escape(f.threshold)}; {escape(f.when)}</p>'
        + (f'<p class="hint"><b>What usually fixes it:</b> {_inline(f.hint)}</p>' if f.hint else "")
        + (f'<p class="note">{_inline(replay_line(f))}</p>' if f.replay else "")
        + "</div>"
    )


def render_html(content: ReportContent, images: dict) -> str:
    """The whole page as one string; ``images`` maps plot ids to rendered :class:`Image` (or an exception)."""
    c = content
    nav = ['<a href="#overview">Overview</a>', '<a href="#findings">Findings</a>'] + [
        f'<a href="#{escape(s.id)}">{escape(s.title)}</a>' for s in c.sections
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(c.title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{escape(c.title)}</h1>",
        f"<nav>{''.join(nav)}</nav>",
        '<section id="overview">',
        f'<div class="verdict" data-verdict="{escape(c.verdict)}"><span class="badge {escape(c.verdict)}">'
        f"{escape(c.verdict)}</span><span>{_inline(c.verdict_line)}</span></div>",
        '<table class="facts"><tbody>',
        *[f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in c.facts],
        "</tbody></table></section>",
        '<section id="findings"><h2>Findings</h2>',
    ]
    if not c.findings:
        parts.append("<p>No findings: every rule stayed silent.</p>")
    else:
        parts.append(
            '<table class="findings" id="findings-table"><thead><tr>'
            + "".join(
                f"<th>{h}</th>"
                for h in ("incident", "severity", "code", "target", "value", "threshold", "from step", "cleared")
            )
            + "</tr></thead><tbody>"
        )
        index = {id(f): i for i, f in enumerate(c.findings)}
        for f in c.table_rows():
            if isinstance(f, tuple):
                parts.append(f'<tr class="consequence"><td class="num">↳</td><td></td><td colspan="6">'
                             f'<a href="#incident-{f[0]}">+ {f[1]} more consequences</a></td></tr>')
                continue
            i = index[id(f)]
            mark = "↳" if f.consequence else str(f.incident)
            parts.append(
                f'<tr class="{"consequence" if f.consequence else "root"}"><td class="num">{mark}</td>'
                f'<td class="sev {escape(f.severity)}">{escape(f.severity)}</td>'
                f'<td><a href="#finding-{i}"><code>{escape(f.code)}</code></a></td>'
                f'<td class="mono">{escape(f.target)}</td><td class="num">{escape(f.value)}</td>'
                f'<td class="num">{escape(f.threshold)}</td><td class="num">{escape(f.started)}</td>'
                f'<td class="num">{escape(f.cleared)}</td></tr>'
            )
        parts.append("</tbody></table>")
        for root, consequences in c.by_incident():
            parts.append(f'<div class="incident" id="incident-{root.incident}">')
            parts.append(_finding_card(root, index[id(root)], f"Incident {root.incident} — "))
            if consequences:
                n = len(consequences)
                parts.append(
                    f"<details><summary>+ {n} finding{'s' if n != 1 else ''} follow{'s' if n == 1 else ''} "
                    "from it — consequences: fix the cause first</summary>"
                )
                parts += [_finding_card(f, index[id(f)], "") for f in consequences]
                parts.append("</details>")
            parts.append("</div>")
    parts.append("</section>")
    for s in c.sections:
        parts.append(_section(s, images))
    parts.append(
        "<footer>Written by stethoscope. <code>stethoscope findings RUN_DIR</code> lists the findings; "
        "docs/findings.md explains every code.</footer>"
    )
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"
