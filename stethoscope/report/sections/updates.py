"""The report's update-to-weight ratio section: ‖Δw‖ / ‖w‖ per layer over the sampled steps, and the
parameters furthest from the median."""

from __future__ import annotations

import math

import numpy as np

from stethoscope.report.model import (
    MAX_LINES,
    TOP_N,
    Plot,
    Section,
    Table,
    fmt,
    group_frame,
    group_lines,
    numeric_steps,
)
from stethoscope.report.registry import register_section
from stethoscope.run import Run

_HEAD = {"update_norm": "‖Δw‖", "weight_norm": "‖w‖", "ratio": "‖Δw‖ / ‖w‖"}


@register_section("updates", order=60)
def updates(run: Run) -> Section | None:
    ups = run.metrics_of("update")
    if ups.empty or "ratio" not in ups:
        return None
    ups = numeric_steps(ups)
    section = Section(
        "updates",
        "Update-to-weight ratios",
        "‖Δw‖ / ‖w‖ of each optimizer step. Around 1e-3 is the usual healthy value; far above, the "
        "learning rate is too high for that block; far below, it barely moves. With Adam it sits "
        "near lr / rms(w).",
    )
    if {"update_norm", "weight_norm"} <= set(ups.columns):
        df, groups = group_frame(ups, MAX_LINES)
        g = df.assign(u2=df["update_norm"].astype(float) ** 2, w2=df["weight_norm"].astype(float) ** 2)
        g = g.groupby(["group", "step"], sort=False)[["u2", "w2"]].sum()
        agg = (g["u2"].pow(0.5) / g["w2"].pow(0.5).where(g["w2"] > 0)).rename("ratio").reset_index()
    else:
        df, groups = group_frame(ups, MAX_LINES)
        agg = df.groupby(["group", "step"], sort=False)["ratio"].median().reset_index()
    series = group_lines(agg, "ratio", groups)
    if series:
        section.plots.append(
            Plot(
                "update-ratio",
                "Update-to-weight ratio per layer",
                "lines",
                {
                    "series": series,
                    "xlabel": "sampled step",
                    "ylabel": "‖Δw‖ / ‖w‖",
                    "logy": True,
                    "hlines": [(1e-3, "1e-3")],
                    "colorbar": "depth" if len(series) > 10 else None,
                },
                caption="Per block: ‖Δw‖ / ‖w‖ over the block's parameters (log scale); the dotted line is 1e-3.",
            )
        )
    last_step = ups["step"].max()
    last = ups[(ups["step"] == last_step) & ups["ratio"].notna()]
    if not last.empty:
        med = float(last["ratio"].median())
        # the ones furthest from the typical ratio, in decades
        key = (np.log10(last["ratio"].astype(float).clip(lower=1e-30)) - math.log10(max(med, 1e-30))).abs()
        top = last.assign(_k=key).sort_values("_k", ascending=False).head(TOP_N)
        cols = [c for c in ("ratio", "update_norm", "weight_norm") if c in top]
        section.tables.append(
            Table(
                ["parameter", *[_HEAD.get(c, c) for c in cols]],
                [[r["name"], *[fmt(r[c]) for c in cols]] for _, r in top.iterrows()],
                caption=f"Ratios furthest from the median ({fmt(med)}) at step {last_step}",
                note=f"top {len(top)} of {len(last):,} parameters" if len(last) > len(top) else "",
                code_columns=(0,),
            )
        )
    return section if section.plots or section.tables else None
