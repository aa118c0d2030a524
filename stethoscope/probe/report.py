"""``report.md``, the heatmaps and the results zip: what a person reads to make the GO / NOGO call."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from stethoscope.probe.config import PipelineConfig
from stethoscope.probe.decision import VERDICTS, Decision

_HEAT_COLUMNS = [
    ("target_f1", "target F1"),
    ("selectivity", "selectivity"),
    ("leakage", "leakage"),
    ("text_drop", "text drop"),
]


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _f(x, digits: int = 3) -> str:
    return "n/a" if _nan(x) else f"{x:.{digits}f}"


def _name(r: dict) -> str:
    return f"{r['representation']}:{r['layer']}"


def _goodness(column: str, values: np.ndarray, decision) -> np.ndarray:
    """Map a metric to [0, 1] (red -> green) on a fixed scale anchored at its threshold."""
    if column == "target_f1":  # red below NOGO, green from GO up
        lo, hi = decision.max_f1_nogo - 0.1, decision.min_f1_go + 0.1
        return np.clip((values - lo) / (hi - lo), 0, 1)
    if column == "selectivity":
        return np.clip(values / 0.5, 0, 1)
    limit = decision.leakage_margin_pp / 100.0 if column == "leakage" else decision.max_text_drop
    return np.clip(1 - values / (2 * limit), 0, 1)  # green at 0, yellow at the threshold, red at twice it


def metrics_heatmap(rows: list[dict], path: Path, decision) -> Path:
    """Layer x metric heatmap, coloured on fixed scales around each GO threshold, values printed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    values = np.array([[r.get(c, math.nan) for c, _ in _HEAT_COLUMNS] for r in rows], dtype=float)
    colour = np.stack(
        [_goodness(c, values[:, j], decision) for j, (c, _) in enumerate(_HEAT_COLUMNS)], axis=1
    )
    height = max(2.5, 0.35 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(7.5, height))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    ax.imshow(np.ma.masked_invalid(colour), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(_HEAT_COLUMNS)), [label for _, label in _HEAT_COLUMNS])
    ax.set_yticks(range(len(rows)), [_name(r) for r in rows])
    for i in range(len(rows)):
        for j in range(len(_HEAT_COLUMNS)):
            ax.text(j, i, _f(values[i, j], 2), ha="center", va="center", fontsize=8)
    ax.set_title("probe metrics per layer (green: good, red: fails its GO threshold; grey: n/a)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_figure(cm: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix (true x predicted) with the counts printed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(3.5, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.6 else "black",
            )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metrics_table(rows: list[dict], target: str, nuisance: str | None) -> list[str]:
    leak = f"Leak {target}→{nuisance}" if nuisance else "Leakage"
    head = f"| Layer | {target} F1 [95% CI] | Acc | Chance F1 | Selectivity | {leak} | Text drop | Status |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = _name(r) + (" (baseline)" if r.get("baseline") else "")
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
    from stethoscope.probe.pipeline import config_fingerprint

    out = Path(cfg.output_dir)
    cols = cfg.dataset.columns
    figures: list[Path] = []
    if cfg.report.figures and rows:
        figures.append(metrics_heatmap(rows, out / "figures" / "metrics_heatmap.png", cfg.decision))
        best = next(
            (d for d in details.get("rows", []) if f"{d['representation']}:{d['layer']}" == decision.best),
            None,
        )
        if best is not None and best.get("confusion") is not None:
            figures.append(
                confusion_figure(
                    np.array(best["confusion"]),
                    details.get("target_classes", []),
                    f"{decision.best}: {cols.target} (all folds)",
                    out / "figures" / "confusion_best.png",
                )
            )
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
    unconverged = [_name(r) for r in rows if str(r.get("converged")).lower() == "false"]
    if unconverged:
        lines.append(
            f"- **Note:** probes of {', '.join(unconverged)} stopped at probe.max_iter before converging."
        )
    if figures:
        lines += ["", "## Figures", ""]
        for fig in figures:
            rel = fig.relative_to(out).as_posix()
            lines.append(f"![{fig.stem}]({rel})")
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
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    if cfg.report.zip:
        write_zip(out)
    return path


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
