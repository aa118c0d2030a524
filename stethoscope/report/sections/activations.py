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
    nothing_to_see,
    numeric_steps,
    pct,
    step_axis,
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
    # The model's own outputs (``<model>``: logits, a loss) are not activations, and the module that produces
    # them (``lm_head``) gives logits, where values beyond ±3 are normal: no saturation is shown for them,
    # and the model's output rows, which repeat that module's, are left out.
    heads = output_modules(acts)
    acts = acts[acts["name"] != ""]
    if acts.empty:
        return None
    if heads and "saturation_fraction" in acts:
        acts = acts.assign(saturation_fraction=acts["saturation_fraction"].where(~acts["name"].isin(heads)))
        section.notes.append(
            f"{', '.join(f'`{h}`' for h in heads)} produce{'s' if len(heads) == 1 else ''} the model's output "
            "(logits): values beyond the saturation bound are normal there, so no saturation is shown for "
            f"{'it' if len(heads) == 1 else 'them'}."
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
        rows = [g for g, row in zip(groups, matrix, strict=True) if np.isfinite(row).any()]  # not lm_head's
        matrix = matrix[[i for i, row in enumerate(matrix) if np.isfinite(row).any()]]
        if nothing_to_see(matrix):  # one flat dark picture: a word says it better
            section.notes.append(
                f"{title.capitalize()}: none — no module reached 0.1 % at any of the {len(steps)} sampled steps "
                f"(largest {pct(np.nanmax(matrix))}), so its heatmap is left out."
            )
            continue
        panels.append(
            Plot(
                f"act-{col}",
                title.capitalize(),
                "heatmap",
                {
                    "matrix": matrix,
                    "rows": rows,
                    "cols": steps,
                    "xlabel": step_axis(steps),
                    "cbar": "fraction",
                    "vmin": 0.0,
                    "vmax": max(0.05, float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 1.0),
                    "cmap": cmap,
                },
            )
        )
    if panels:
        words = {"act-saturation_fraction": "share of output entries with |x| above the saturation bound",
                 "act-dead_fraction": "share of output features zero for every input row"}
        sides = ["Left", "Right"] if len(panels) == 2 else ["Shown"]
        section.plots.append(
            Plot(
                "activations",
                "Saturation and dead features per layer" if len(panels) == 2 else panels[0].title + " per layer",
                "panels",
                {},
                panels=panels,
                caption=" ".join(f"{side}: {words[p.id]}." for side, p in zip(sides, panels, strict=True))
                + " Worst module of each row, one column per sampled step.",
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


def output_modules(acts: pd.DataFrame) -> list[str]:
    """The modules whose output is one of the model's own outputs (the rows named ""): same step, same
    number of entries, same mean and std — the language-model head that gives the logits, typically."""
    outs = acts[acts["name"] == ""]
    if outs.empty or not {"mean", "std", "count"} <= set(acts.columns):
        return []
    keys = ["step", "count"]
    inner = acts[acts["name"] != ""]
    both = inner.merge(outs[[*keys, "mean", "std"]], on=keys, suffixes=("", "_out"))
    same = np.isclose(both["mean"].astype(float), both["mean_out"].astype(float), rtol=1e-9, atol=0) & np.isclose(
        both["std"].astype(float), both["std_out"].astype(float), rtol=1e-9, atol=0)
    return sorted(set(both.loc[same, "name"]))
