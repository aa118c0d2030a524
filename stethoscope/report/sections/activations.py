"""The report's activations section: saturated entries and dead features per layer and sampled step, and the
most saturated or dead module outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stethoscope.report.model import (
    MAX_ROWS,
    TOP_N,
    Plot,
    Section,
    Table,
    fmt,
    group_frame,
    numeric_steps,
    pct,
    step_matrix,
)
from stethoscope.report.registry import register_section
from stethoscope.run import Run


@register_section("activations", order=50)
def activations(run: Run) -> Section | None:
    acts = run.metrics_of("act")
    if acts.empty:
        return None
    acts = numeric_steps(acts)
    acts = acts.assign(name=acts["name"].fillna(""))
    section = Section(
        "activations",
        "Activations",
        "Module outputs at the sampled steps: the share of entries beyond the saturation bound and "
        "the share of features that are zero for every input (dead units), worst module per "
        "block.",
    )
    if "dead_features" in acts:
        # dead_features is a count of features; the share of the output's features reads across layers
        feats = acts["features"].astype(float) if "features" in acts else pd.Series(np.nan, index=acts.index)
        acts = acts.assign(dead_fraction=acts["dead_features"].astype(float) / feats.where(feats > 0))
    df, groups = group_frame(acts, MAX_ROWS)
    panels = []
    for col, title, cmap in (
        ("saturation_fraction", "saturated entries", "viridis"),
        ("dead_fraction", "dead features", "magma"),
    ):
        if col not in df or df[col].notna().sum() == 0:
            continue
        matrix, steps = step_matrix(df, col, groups, how="max")
        panels.append(
            Plot(
                f"act-{col}",
                title.capitalize(),
                "heatmap",
                {
                    "matrix": matrix,
                    "rows": groups,
                    "cols": steps,
                    "xlabel": "sampled step",
                    "cbar": "fraction",
                    "vmin": 0.0,
                    "vmax": max(0.05, float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 1.0),
                    "cmap": cmap,
                },
            )
        )
    if panels:
        section.plots.append(
            Plot(
                "activations",
                "Saturation and dead features per layer",
                "panels",
                {},
                panels=panels,
                caption="Left: share of output entries with |x| above the "
                "saturation bound. Right: share of output features zero for every input row. "
                "Worst module of each row, per sampled step.",
            )
        )
    last_step = acts["step"].max()
    last = acts[acts["step"] == last_step]
    sort_col = "saturation_fraction" if "saturation_fraction" in last else None
    if sort_col:
        if "dead_fraction" in last:
            last = last.assign(_key=last["saturation_fraction"].fillna(0) + last["dead_fraction"].fillna(0))
            sort_col = "_key"
        top = last.sort_values(sort_col, ascending=False).head(TOP_N)
        cols = [
            c for c in ("mean", "std", "saturation_fraction", "zero_fraction", "dead_fraction") if c in top
        ]
        heads = {
            "saturation_fraction": "saturated",
            "zero_fraction": "zeros",
            "dead_fraction": "dead features",
        }
        rows = []
        for _, r in top.iterrows():
            name = r["name"] or "<model>"
            if isinstance(r.get("output"), str) and r.get("output"):
                name = f"{name} [{r['output']}]"
            cells = [pct(r[c]) if c in heads else fmt(r[c]) for c in cols]
            if "dead_fraction" in cols and pd.notna(r.get("dead_features")) and pd.notna(r.get("features")):
                cells[-1] = f"{int(r['dead_features'])} of {int(r['features'])}"
            rows.append([name, *cells])
        section.tables.append(
            Table(
                ["module", *[heads.get(c, c) for c in cols]],
                rows,
                caption=f"Most saturated or dead module outputs at step {last_step}",
                note=f"top {len(top)} of {len(last):,} outputs" if len(last) > len(top) else "",
                code_columns=(0,),
            )
        )
    return section if section.plots or section.tables else None
