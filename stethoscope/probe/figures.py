"""The probe report's figures (matplotlib, Agg backend): the layer × metric heatmap and the best layer's
confusion matrix. Drawing only; :mod:`stethoscope.probe.report` writes the text that links them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stethoscope._format import format_fixed
from stethoscope.probe.config import PipelineConfig
from stethoscope.probe.decision import Decision

HEAT_COLUMNS = [
    ("target_f1", "target F1"),
    ("selectivity", "selectivity"),
    ("leakage", "leakage"),
    ("text_drop", "text drop"),
]


def row_label(r: dict) -> str:
    """``representation:layer``: how a metrics row is named in the figures and the report."""
    return f"{r['representation']}:{r['layer']}"


def draw_figures(cfg: PipelineConfig, rows: list[dict], details: dict, decision: Decision) -> list[Path]:
    """Draw the report's figures into ``cfg.output_dir/figures`` (none when ``report.figures`` is off or
    there are no rows); return their paths in the order the report shows them."""
    out = Path(cfg.output_dir)
    figures: list[Path] = []
    if not (cfg.report.figures and rows):
        return figures
    figures.append(metrics_heatmap(rows, out / "figures" / "metrics_heatmap.png", cfg.decision))
    best = next((d for d in details.get("rows", []) if row_label(d) == decision.best), None)
    if best is not None and best.get("confusion") is not None:
        figures.append(
            confusion_figure(
                np.array(best["confusion"]),
                details.get("target_classes", []),
                f"{decision.best}: {cfg.dataset.columns.target} (all folds)",
                out / "figures" / "confusion_best.png",
            )
        )
    return figures


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

    values = np.array([[r.get(c, math.nan) for c, _ in HEAT_COLUMNS] for r in rows], dtype=float)
    colour = np.stack(
        [_goodness(c, values[:, j], decision) for j, (c, _) in enumerate(HEAT_COLUMNS)], axis=1
    )
    height = max(2.5, 0.35 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(7.5, height))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    ax.imshow(np.ma.masked_invalid(colour), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(HEAT_COLUMNS)), [label for _, label in HEAT_COLUMNS])
    ax.set_yticks(range(len(rows)), [row_label(r) for r in rows])
    for i in range(len(rows)):
        for j in range(len(HEAT_COLUMNS)):
            ax.text(j, i, format_fixed(values[i, j], 2), ha="center", va="center", fontsize=8)
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
