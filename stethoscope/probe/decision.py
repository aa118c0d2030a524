"""GO / NOGO from the metrics table and the ``decision`` thresholds (the field note's rules).

* **GO (strong)**: some layer has target F1 >= ``min_f1_go``, leakage <= ``leakage_margin_pp`` points
  above chance and text drop < ``max_text_drop`` -> fine-tune from it.
* **GO (conditional)**: otherwise, some layer has F1 >= ``min_f1_conditional`` -> go on, with adversarial
  regularisation against the nuisance (or more text variety, if the text drop failed).
* **NOGO**: every layer has F1 < ``max_f1_nogo`` -> change the dataset or the backbone.
* **INCONCLUSIVE**: the best F1 lies between ``max_f1_nogo`` and ``min_f1_conditional`` -> collect more data.

A metric that could not be measured (no nuisance or no content column) does not block a GO; the
decision says it was not measured. Baseline representations (the log-mel front end) never become
the best layer, but the decision notes when one beats every backbone layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from stethoscope._format import format_fixed
from stethoscope.probe.config import DecisionConfig

VERDICTS = {
    "go": "GO (strong)",
    "go_conditional": "GO (conditional)",
    "inconclusive": "INCONCLUSIVE",
    "nogo": "NOGO",
}


@dataclass
class Decision:
    """The outcome: ``code`` in go | go_conditional | inconclusive | nogo, the best layer, and why."""

    code: str
    best: str | None
    rationale: str
    notes: list[str] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return VERDICTS[self.code]

    def to_dict(self) -> dict:
        return {"schema_version": 1, "verdict": self.verdict, **asdict(self)}


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(x) -> str:
    return format_fixed(x, 2)


def row_status(row: dict, cfg: DecisionConfig) -> str:
    """The verdict one layer would get on its own (the ``status`` column of metrics.csv)."""
    f1 = row.get("target_f1")
    if _nan(f1):
        return "nogo"
    if f1 >= cfg.min_f1_go and not _failed(row, cfg):
        return "go"
    if f1 >= cfg.min_f1_conditional:
        return "go_conditional"
    if f1 < cfg.max_f1_nogo:
        return "nogo"
    return "inconclusive"


def _failed(row: dict, cfg: DecisionConfig) -> list[str]:
    """The strong-GO criteria other than F1 that this row misses, as phrases."""
    out = []
    leak, drop = row.get("leakage"), row.get("text_drop")
    margin = cfg.leakage_margin_pp / 100.0
    if not _nan(leak) and leak > margin:
        out.append(f"leakage {leak:.2f} > {margin:.2f} above chance")
    if not _nan(drop) and drop >= cfg.max_text_drop:
        out.append(f"text drop {drop:.2f} >= {cfg.max_text_drop:.2f}")
    return out


def _name(row: dict) -> str:
    return f"{row['representation']}:{row['layer']}"


def decide(rows: list[dict], cfg: DecisionConfig, dataset_warnings: list[str] | None = None) -> Decision:
    """Apply the thresholds to the metrics rows (dicts with metrics.csv's columns).

    Args:
        rows: one per representation/layer; ``baseline`` rows are reported but not chosen.
        cfg: thresholds.
        dataset_warnings: the size check's warnings, repeated as a note (small sets are not conclusive).
    """
    rows = [r for r in rows if not _nan(r.get("target_f1"))]
    if not rows:
        return Decision("nogo", None, "No layer produced a target F1; nothing can be decided.")
    candidates = [r for r in rows if not r.get("baseline")] or rows
    margin = cfg.leakage_margin_pp / 100.0
    strong = [r for r in candidates if r["target_f1"] >= cfg.min_f1_go and not _failed(r, cfg)]
    cond = [r for r in candidates if r["target_f1"] >= cfg.min_f1_conditional]
    best_overall = max(candidates, key=lambda r: r["target_f1"])
    if strong:
        best = max(strong, key=lambda r: r["target_f1"])
        code = "go"
        rationale = (
            f"{_name(best)} passes every GO threshold (F1 {best['target_f1']:.2f} >= {cfg.min_f1_go:.2f}, "
            f"leakage {_fmt(best.get('leakage'))} <= {margin:.2f}, text drop {_fmt(best.get('text_drop'))} "
            f"< {cfg.max_text_drop:.2f}): fine-tune from this layer."
        )
    elif cond:
        best = max(cond, key=lambda r: r["target_f1"])
        code = "go_conditional"
        misses = []
        if best["target_f1"] < cfg.min_f1_go:
            misses.append(f"F1 {best['target_f1']:.2f} < {cfg.min_f1_go:.2f}")
        failed = _failed(best, cfg)
        misses += failed
        action = "add adversarial regularisation against the nuisance attribute"
        if failed and all(f.startswith("text drop") for f in failed):
            action = "train on more varied texts and watch the unseen-text F1"
        rationale = (
            f"{_name(best)} reaches F1 {best['target_f1']:.2f} >= {cfg.min_f1_conditional:.2f} but misses a "
            f"strong GO ({'; '.join(misses)}): go on, and {action}."
        )
    elif best_overall["target_f1"] < cfg.max_f1_nogo:
        best = best_overall
        code = "nogo"
        rationale = (
            f"No layer reaches F1 {cfg.max_f1_nogo:.2f} (best: {_name(best)} at {best['target_f1']:.2f}, "
            f"chance {_fmt(best.get('chance_f1'))}): the attribute is not linearly decodable here; change "
            "the dataset or the backbone."
        )
    else:
        best = best_overall
        code = "inconclusive"
        rationale = (
            f"The best F1 ({best['target_f1']:.2f}, {_name(best)}) lies between {cfg.max_f1_nogo:.2f} and "
            f"{cfg.min_f1_conditional:.2f}: collect more data (more groups per class) before deciding."
        )
    notes = []
    if all(_nan(r.get("text_drop")) for r in candidates):
        notes.append(
            "Text drop not measured (n/a): the set has no content column with enough distinct values "
            "(dataset.columns.content), so robustness to unseen texts is unknown."
        )
    if all(_nan(r.get("leakage")) for r in candidates):
        notes.append("Leakage not measured (n/a): no nuisance column (dataset.columns.nuisance).")
    baselines = [r for r in rows if r.get("baseline")]
    if baselines and candidates is not rows:
        top = max(baselines, key=lambda r: r["target_f1"])
        if top["target_f1"] >= best_overall["target_f1"]:
            notes.append(
                f"The baseline {_name(top)} scores F1 {top['target_f1']:.2f}, at least as high as every "
                "backbone layer: the backbone adds nothing a classical front end does not already give."
            )
    if dataset_warnings:
        notes.append("The set is below the recommended size: " + "; ".join(dataset_warnings) + ".")
    keep = ("target_f1", "target_f1_ci_low", "target_f1_ci_high", "leakage", "text_drop", "selectivity")
    return Decision(code, _name(best), rationale, notes, {k: best.get(k) for k in keep})
