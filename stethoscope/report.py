"""The run report: ``report.md`` (and the console summary, which says the same in fewer words).

The Markdown twin is plain text a person reads top-down: verdict, run summary, findings most severe first
with their hints, and a few key figures (loss, gradient norm, the modules and parameters that stand out).
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stethoscope.console import SEVERITY_STYLE, get_console
from stethoscope.run import Finding, Run, load_run

_VERDICT_WORDS = {
    "healthy": "healthy — no warning or critical finding",
    "warning": "warning — something needs a look",
    "critical": "critical — training is likely broken",
}


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _when(f: Finding) -> str:
    start = "preflight" if f.first_step is None else f"step {f.first_step}"
    if f.cleared_step is not None:
        return f"{start} → cleared at step {f.cleared_step}"
    return f"{start} → still open"


def render_markdown(run: Run, top: int = 10) -> str:
    meta = run.meta
    verdict = run.verdict
    model = meta.get("model", {})
    versions = meta.get("versions", {})
    lines = [f"# stethoscope report — {run.path.name}", ""]
    lines.append(f"**Verdict: {_VERDICT_WORDS.get(verdict['status'], verdict['status'])}** "
                 f"({verdict['counts']['critical']} critical, {verdict['counts']['warning']} warning, "
                 f"{verdict['counts']['info']} info)")
    lines.append("")
    lines.append("## Run")
    lines.append("")
    lines.append("| | |")
    lines.append("|---|---|")
    scal = run.scalars()
    steps = meta.get("last_step")
    rows = [
        ("status", meta.get("status", "unknown")),
        ("model", f"{model.get('class', '?')} — {model.get('parameters', 0):,} parameters "
                  f"({model.get('trainable_parameters', 0):,} trainable), {model.get('modules', '?')} modules"),
        ("optimizer", (meta.get("optimizer") or {}).get("class", "none")),
        ("last step", steps),
        ("started", meta.get("started_at")),
        ("ended", meta.get("ended_at")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "platform")),
    ]
    if meta.get("error"):
        rows.append(("error", meta["error"]))
    for key, value in rows:
        lines.append(f"| {key} | {_md_escape(_fmt(value))} |")
    lines.append("")

    lines.append("## Findings")
    lines.append("")
    if not run.findings:
        lines.append("No findings: every rule stayed silent.")
    else:
        lines.append("| severity | code | target | value | threshold | when |")
        lines.append("|---|---|---|---|---|---|")
        for f in run.findings:
            lines.append(
                f"| {f.severity} | `{f.code}` | `{_md_escape(f.target or '—')}` | {_fmt(f.worst_value)} | "
                f"{_fmt(f.threshold)} | {_when(f)} |"
            )
        lines.append("")
        for f in run.findings:
            lines.append(f"### {f.severity}: `{f.code}` on `{f.target or '—'}`")
            lines.append("")
            lines.append(f"{f.message}")
            lines.append("")
            if f.hint:
                lines.append(f"*What usually fixes it:* {f.hint}")
                lines.append("")
    lines.append("")

    lines.append("## Key figures")
    lines.append("")
    if not scal.empty:
        lines.append("| step | " + " | ".join(scal.columns) + " |")
        lines.append("|---|" + "---|" * len(scal.columns))
        picks = _spread(list(scal.index), 8)
        for step in picks:
            row = scal.loc[step]
            lines.append(f"| {step} | " + " | ".join(_fmt(row[c]) for c in scal.columns) + " |")
        lines.append("")
    grads = run.metrics_of("grad")
    if not grads.empty and "norm" in grads:
        last = grads[grads["step"] == grads["step"].max()]
        lines.append(f"Gradients at step {int(last['step'].iloc[0])}, largest norms:")
        lines.append("")
        lines.append("| parameter | norm | zero fraction | non-finite |")
        lines.append("|---|---|---|---|")
        for _, r in last.sort_values("norm", ascending=False).head(top).iterrows():
            lines.append(f"| `{r['name']}` | {_fmt(r.get('norm'))} | {_fmt(r.get('zero_fraction'))} | "
                         f"{_fmt(r.get('nonfinite'))} |")
        lines.append("")
    acts = run.metrics_of("act")
    if not acts.empty and "saturation_fraction" in acts:
        last = acts[acts["step"] == acts["step"].max()]
        lines.append(f"Activations at step {int(last['step'].iloc[0])}, most saturated (|x| > bound):")
        lines.append("")
        lines.append("| module | mean | std | saturated | zero fraction | dead features |")
        lines.append("|---|---|---|---|---|---|")
        for _, r in last.sort_values("saturation_fraction", ascending=False).head(top).iterrows():
            name = r["name"] or "<model>"
            if r.get("output"):
                name = f"{name} [{r['output']}]"
            lines.append(f"| `{name}` | {_fmt(r.get('mean'))} | {_fmt(r.get('std'))} | "
                         f"{_fmt(r.get('saturation_fraction'))} | {_fmt(r.get('zero_fraction'))} | "
                         f"{_fmt(r.get('dead_features'))} |")
        lines.append("")
    lines.append("---")
    lines.append("Written by stethoscope. `stethoscope findings RUN_DIR` lists the findings; "
                 "`docs/findings.md` explains every code.")
    return "\n".join(lines) + "\n"


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` into the run directory and return its path."""
    run = load_run(run_dir)
    path = Path(run_dir) / "report.md"
    path.write_text(render_markdown(run), encoding="utf-8")
    return path


def findings_table(run: Run, title: str | None = None) -> Table:
    """The findings as a rich table, most severe first (the console twin of the report's table)."""
    table = Table(title=title, show_lines=False, expand=False)
    for col in ("severity", "code", "target", "value", "threshold", "when"):
        table.add_column(col, overflow="fold")
    for f in run.findings:
        style = SEVERITY_STYLE.get(f.severity, "")
        table.add_row(f"[{style}]{f.severity}[/]", f.code, f.target or "—", _fmt(f.worst_value),
                      _fmt(f.threshold), _when(f))
    return table


def print_summary(run_dir: str | Path, console: Console | None = None) -> None:
    """The end-of-run summary: verdict, findings table, where the files are."""
    console = console or get_console()
    run = load_run(run_dir)
    verdict = run.verdict
    style = {"healthy": "bold green", "warning": "bold yellow", "critical": "bold red"}[verdict["status"]]
    console.print(f"[{style}]stethoscope verdict: {_VERDICT_WORDS[verdict['status']]}[/]")
    if run.findings:
        console.print(findings_table(run))
    console.print(f"run directory: {run.path}")
    if (run.path / "report.md").is_file():
        console.print(f"report: {run.path / 'report.md'}")
