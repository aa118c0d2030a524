"""The report's gradients section: norm per layer, the zero-gradient heatmap (progressive gradient death),
the largest norms, the most zero gradients and the parameters that received none."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stethoscope.report.model import (
    MAX_LINES,
    TOP_N,
    Plot,
    Section,
    Table,
    first_seen,
    fmt,
    group_frame,
    group_lines,
    nothing_to_see,
    numeric_steps,
    pct,
    step_axis,
    step_matrix,
    top_note,
)
from stethoscope.report.registry import register_section
from stethoscope.run import Run

_HEAD = {"zero_fraction": "zero fraction"}


@register_section("gradients", order=40)
def gradients(run: Run) -> Section | None:
    grads = run.metrics_of("grad")
    if grads.empty:
        return None
    grads = numeric_steps(grads)
    missing_mask = (
        grads["missing"].fillna(False).astype(bool)
        if "missing" in grads
        else pd.Series(False, index=grads.index)
    )
    missing = grads[missing_mask]
    present = grads[~missing_mask]
    section = Section(
        "gradients",
        "Gradients",
        "Per-parameter gradient statistics at the sampled steps, grouped by block for a big model. "
        "A block whose zero-gradient share climbs step after step is dying "
        "(progressive gradient death); a norm that falls by decades is vanishing.",
    )
    if not present.empty and "norm" in present:
        nparams = present["name"].nunique()
        df, groups = group_frame(present, MAX_LINES)
        # a block's norm is the L2 norm over its parameters: sqrt(sum of squared norms)
        sq = df.assign(sq=df["norm"].astype(float) ** 2).groupby(["group", "step"], sort=False)["sq"].sum()
        agg = sq.pow(0.5).rename("norm").reset_index()
        series = group_lines(agg, "norm", groups)
        ys = np.concatenate([s[2] for s in series]) if series else np.array([])
        pos = ys[np.isfinite(ys) & (ys > 0)]
        section.plots.append(
            Plot(
                "grad-norm",
                "Gradient norm per layer",
                "lines",
                {
                    "series": series,
                    "xlabel": "sampled step",
                    "ylabel": "‖g‖ (L2)",
                    "logy": bool(len(pos) and pos.max() > 0),
                    "colorbar": "depth" if len(series) > 10 else None,
                },
                caption=f"L2 norm of the gradient of each {'parameter' if nparams == len(groups) else 'block'} "
                "over the sampled steps (log scale).",
            )
        )
        if "zero_fraction" in df:
            weights = df["count"].astype(float) if "count" in df else None
            if weights is not None:
                df = df.assign(zf_w=df["zero_fraction"].astype(float) * weights, w=weights)
                g = df.groupby(["group", "step"], sort=False)[["zf_w", "w"]].sum()
                agg = (g["zf_w"] / g["w"].where(g["w"] > 0)).rename("zero_fraction").reset_index()
            else:
                agg = df.groupby(["group", "step"], sort=False)["zero_fraction"].mean().reset_index()
            matrix, steps = step_matrix(agg, "zero_fraction", groups, how="max")
            if nothing_to_see(matrix):  # a picture of one dark colour says less than one word
                section.notes.append(
                    "Zero-gradient fraction: none — no block had 0.1 % or more of its gradient entries at zero "
                    f"at any of the {len(steps)} sampled steps (largest {pct(np.nanmax(matrix))}), so the "
                    "layer × step heatmap is left out."
                )
            else:
                section.plots.append(_zero_heatmap(matrix, groups, steps))
        last_step = present["step"].max()
        last = present[present["step"] == last_step]
        cols = [c for c in ("norm", "zero_fraction", "absmax", "nonfinite") if c in last]
        top = last.sort_values("norm", ascending=False).head(TOP_N)
        section.tables.append(
            Table(
                ["parameter", *[_HEAD.get(c, c) for c in cols]],
                [
                    [r["name"], *[pct(r[c]) if c == "zero_fraction" else fmt(r[c]) for c in cols]]
                    for _, r in top.iterrows()
                ],
                caption=f"Largest gradient norms at step {last_step}",
                note=f"top {len(top)} of {len(last):,} parameters" if len(last) > len(top) else "",
                code_columns=(0,),
            )
        )
        if "zero_fraction" in last:
            dead = (
                last[last["zero_fraction"] > 0.05].sort_values("zero_fraction", ascending=False).head(TOP_N)
            )
            if not dead.empty:
                section.tables.append(
                    Table(
                        ["parameter", "zero fraction", "norm"],
                        [[r["name"], pct(r["zero_fraction"]), fmt(r["norm"])] for _, r in dead.iterrows()],
                        caption=f"Most zero gradients at step {last_step} (over 5 %)",
                        note=top_note(len(dead), int((last["zero_fraction"] > 0.05).sum()), "parameters"),
                        code_columns=(0,),
                    )
                )
    if not missing.empty:
        names = first_seen(missing["name"])
        section.tables.append(
            Table(
                ["parameter", "sampled steps without a gradient"],
                [[n, str(int((missing["name"] == n).sum()))] for n in names[:TOP_N]],
                caption="Trainable parameters that received no gradient",
                note=f"{TOP_N} of {len(names):,} shown" if len(names) > TOP_N else "",
                code_columns=(0,),
            )
        )
    return section if section.plots or section.tables else None


def _zero_heatmap(matrix: np.ndarray, groups: list[str], steps: list) -> Plot:
    return Plot(
        "grad-zero",
        "Zero-gradient fraction, layer × step",
        "heatmap",
        {
            "matrix": matrix,
            "rows": groups,
            "cols": steps,
            "xlabel": step_axis(steps),
            "cbar": "zero fraction",
            "vmin": 0.0,
            "vmax": 1.0,
            "cmap": "magma",
        },
        caption="Share of gradient entries that are (near) zero. Rows turning bright from left to right are the "
        "picture of progressive gradient death. One column per sampled step.",
    )
