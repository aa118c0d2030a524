"""``report.md`` and the results zip: what a person reads to make the GO / NOGO call.

:func:`report_lines` is the report's text; :func:`write_report` draws the figures
(:mod:`stethoscope.probe.figures`), writes ``report.md`` and, if configured, ``probe_results.zip``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

from stethoscope._format import format_fixed as _f
from stethoscope.probe.config import PipelineConfig
from stethoscope.probe.decision import VERDICTS, Decision
from stethoscope.probe.figures import draw_figures, row_label
from stethoscope.probe.fingerprint import config_fingerprint


def _metrics_table(rows: list[dict], target: str, nuisance: str | None) -> list[str]:
    leak = f"Leak {target}→{nuisance}" if nuisance else "Leakage"
    head = f"| Layer | {target} F1 [95% CI] | Acc | Chance F1 | Selectivity | {leak} | Text drop | Status |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = row_label(r) + (" (baseline)" if r.get("baseline") else "")
        ci = f"{_f(r['target_f1'])} [{_f(r['target_f1_ci_low'], 2)}, {_f(r['target_f1_ci_high'], 2)}]"
        lines.append(
            f"| {name} | {ci} | {_f(r['target_acc'])} | {_f(r['chance_f1'])} | {_f(r['selectivity'])} | "
            f"{_f(r['leakage'])} | {_f(r['text_drop'])} | {VERDICTS.get(r.get('status'), '')} |"
        )
    return lines


def write_report(
    cfg: PipelineConfig, rows: list[dict], details: dict, dataset: dict, decision: Decision
) -> Path:
    """Write figures, ``report.md`` and (if configured) ``probe_results.zip`` into ``cfg.output_dir``."""
    out = Path(cfg.output_dir)
    figures = draw_figures(cfg, rows, details, decision)
    lines = report_lines(cfg, rows, details, dataset, decision, [f.relative_to(out) for f in figures])
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    if cfg.report.zip:
        write_zip(out)
    return path


def report_lines(
    cfg: PipelineConfig,
    rows: list[dict],
    details: dict,
    dataset: dict,
    decision: Decision,
    figures: Sequence[Path] = (),
) -> list[str]:
    """``report.md``'s lines; ``figures`` are the figure files relative to ``cfg.output_dir``."""
    cols = cfg.dataset.columns
    lines = [f"# {cfg.report.title}", ""]
    lines.append(
        f"Target **{cols.target}**, grouped by **{cols.group}**"
        + (f", nuisance **{cols.nuisance}**" if cols.nuisance else "")
        + (f", content **{cols.content}**" if cols.content else "")
        + f". Config fingerprint `{config_fingerprint(cfg)}` (the config used is `config.yaml`)."
    )
    lines += ["", "## Decision", ""]
    lines.append(f"- **Best representation:** {decision.best or 'none'}")
    lines.append(f"- **Decision:** {decision.verdict}")
    lines.append(f"- **Rationale:** {decision.rationale}")
    for note in decision.notes:
        lines.append(f"- **Note:** {note}")
    lines += ["", "## Dataset", ""]
    if dataset:
        lines.append(
            f"{dataset.get('items')} items, {dataset.get('targets')} {cols.target} classes, "
            f"{dataset.get('groups')} {cols.group} groups"
            + (f", {dataset['contents']} distinct {cols.content}" if "contents" in dataset else "")
            + f" ({dataset.get('input')} input)."
        )
        per = dataset.get("groups_per_target", {})
        if per:
            lines.append("")
            lines.append("Groups per class: " + ", ".join(f"{k}: {v}" for k, v in per.items()) + ".")
        if dataset.get("warnings"):
            lines.append("")
        for w in dataset.get("warnings", []):
            lines.append(f"- **Warning:** {w}")
    lines += ["", "## Metrics", ""]
    lines += _metrics_table(rows, cols.target, cols.nuisance)
    lines += [
        "",
        f"- **{cols.target} F1**: macro-F1 of a multinomial logistic probe, mean over {cfg.probe.folds} "
        f"group-disjoint folds (no {cols.group} in both train and test), with a Student-t 95% CI.",
        "- **Chance F1**: 1 / classes (a guess drawn from the class priors).",
        "- **Selectivity**: F1 minus the F1 of the same probe on a control task with labels shuffled per "
        "content value (Hewitt & Liang 2019); near zero means the probe could memorise as well as it probes.",
        f"- **Leakage**: macro-F1 of a {cols.nuisance or 'nuisance'} probe on content-disjoint folds minus its "
        f"chance level ({'the same probe on labels shuffled within each target class' if cfg.probe.leakage_chance == 'shuffled' else '1 / classes'}); "
        f"GO needs at most {cfg.decision.leakage_margin_pp:g} points.",
        "- **Text drop**: F1 on held-out groups reading seen texts minus unseen texts (group- and "
        f"content-disjoint folds); GO needs less than {cfg.decision.max_text_drop:g}.",
    ]
    for note in details.get("notes", []):
        lines.append(f"- **Note:** {note}")
    unconverged = [row_label(r) for r in rows if str(r.get("converged")).lower() == "false"]
    if unconverged:
        lines.append(
            f"- **Note:** probes of {', '.join(unconverged)} stopped at probe.max_iter before converging."
        )
    if figures:
        lines += ["", "## Figures", ""]
        for fig in figures:
            lines.append(f"![{fig.stem}]({Path(fig).as_posix()})")
            lines.append("")
    lines += ["", "## Decision rules", ""]
    d = cfg.decision
    lines += [
        f"- GO (strong): F1 >= {d.min_f1_go}, leakage <= {d.leakage_margin_pp:g} points above chance, "
        f"text drop < {d.max_text_drop}.",
        f"- GO (conditional): F1 >= {d.min_f1_conditional} (proceed with adversarial regularisation).",
        f"- NOGO: F1 < {d.max_f1_nogo} on every layer (change dataset or backbone).",
        "- INCONCLUSIVE: in between (collect more data).",
        "",
        "## Configuration",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
        "",
    ]
    return lines


def write_zip(out: Path) -> Path:
    """``probe_results.zip``: report, metrics, decision, dataset summary, details, config, figures."""
    path = out / "probe_results.zip"
    names = ["report.md", "metrics.csv", "decision.json", "dataset.json", "details.json", "config.yaml"]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            if (out / name).is_file():
                zf.write(out / name, name)
        for fig in sorted((out / "figures").glob("*.png")) if (out / "figures").is_dir() else []:
            zf.write(fig, f"figures/{fig.name}")
    return path
