"""The report's MoE section: the per-layer expert-load heatmap, the router figures per layer, and the output
logits' level over the run (from the ``kind: "moe"`` and ``kind: "logits"`` rows)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from stethoscope.report.model import MAX_ROWS, TOP_N, Plot, Section, Table, first_seen, fmt, numeric_steps
from stethoscope.report.registry import register_section
from stethoscope.run import Run

WINDOW = 8  # sampled steps of load summed for the heatmap (the rules' default moe.window)


def _loads(moe: pd.DataFrame) -> tuple[np.ndarray, list[str], int, int]:
    """(layers × experts) load over the mean, summed over each router's last WINDOW sampled steps."""
    layers = first_seen(moe["name"].fillna(""))[:MAX_ROWS]
    width = int(max(len(v) for v in moe["load"] if isinstance(v, list)))
    matrix = np.full((len(layers), width), np.nan)
    last = int(moe["step"].max())
    for i, name in enumerate(layers):
        rows = [v for v in moe[moe["name"] == name].sort_values("step")["load"] if isinstance(v, list)][-WINDOW:]
        if not rows:
            continue
        total = np.sum([np.asarray(r, dtype=float) for r in rows if len(r) == len(rows[-1])], axis=0)  # (E,)
        mean = total.mean()
        if mean > 0:
            matrix[i, : len(total)] = total / mean
    return matrix, layers, width, last


@register_section("moe", order=72)
def moe(run: Run) -> Section | None:
    moe_rows = run.metrics_of("moe")
    logits = run.metrics_of("logits")
    if moe_rows.empty and logits.empty:
        return None
    logit_text = "the LM head's logit level (softmax ignores it, so it can drift: z-loss pins it)"
    if moe_rows.empty:  # a dense model: only the output logits, and no word about experts it does not have
        section = Section("moe", "Output logits", logit_text[0].upper() + logit_text[1:] + ".")
    else:
        section = Section(
            "moe",
            "Routing and output logits",
            "Tokens per expert in each mixture-of-experts layer (1 = the mean load; 0 = a dead expert), the "
            f"routers' entropy and log Z, and {logit_text}.",
        )
    if not moe_rows.empty and "load" in moe_rows:
        moe_rows = numeric_steps(moe_rows)
        matrix, layers, width, last = _loads(moe_rows)
        section.plots.append(Plot(
            "moe-load", f"Expert load over the last {WINDOW} sampled steps (to step {last})", "heatmap",
            {"matrix": matrix, "rows": layers, "cols": list(range(width)), "xlabel": "expert",
             "cbar": "load / mean", "cmap": "magma", "vmin": 0.0,
             "vmax": float(np.nanmax(matrix)) if np.isfinite(matrix).any() else None},
            caption="Each row sums the router's token counts over the window; a balanced layer is 1 everywhere.",
        ))
        final = moe_rows[moe_rows["step"] == moe_rows.groupby("name")["step"].transform("max")]
        cols = [c for c in ("max_over_mean", "dead", "mean_entropy", "entropy", "log_z_rms") if c in final]
        final = final.sort_values("max_over_mean", ascending=False) if "max_over_mean" in final else final
        section.tables.append(Table(
            ["router", "experts", *cols],
            [[str(r["name"]), fmt(r.get("experts")), *[fmt(r[c]) for c in cols]] for _, r in final.head(TOP_N).iterrows()],
            caption="Each router at its last sampled step (mean_entropy: 0 = every token on the same top-k experts, "
                    "1 = spread evenly; log_z_rms: the router's log Z, log(experts) for uniform logits)",
            note=f"top {TOP_N} of {len(final)}" if len(final) > TOP_N else "",
            code_columns=(0,),
        ))
    if not logits.empty and "log_z" in logits:
        logits = numeric_steps(logits)
        series = []
        for name in first_seen(logits["name"].fillna("")):
            df = logits[logits["name"] == name].sort_values("step")
            for col, label in (("log_z", "log Z"), ("mean_logit", "mean logit")):
                if col in df:
                    ys = [float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else math.nan
                          for v in df[col]]
                    series.append((f"{name} {label}", df["step"].tolist(), ys))
        if series:
            section.plots.append(Plot(
                "logits-level", "Output logit level", "lines",
                {"series": series, "xlabel": "step", "ylabel": "nats", "hlines": [(0.0, "")]},
                caption="log Z = logsumexp of a row's logits (mean over rows); z-loss keeps it near 0.",
            ))
    return section
