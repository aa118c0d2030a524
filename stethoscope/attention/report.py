"""The report's attention section: entropy and sink share per layer and head (or per layer and step), the heads
with the largest sink share, and the pattern pictures and logs written under ``attention/``.

Built from the ``kind: "attn"`` rows the attention extension writes and the files of ``st.attention`` tools.
"""

from __future__ import annotations

import pandas as pd

from stethoscope.report.model import (
    MAX_IMAGES,
    MAX_ROWS,
    TOP_N,
    Link,
    Plot,
    Section,
    Table,
    first_seen,
    fmt,
    group_frame,
    merge_groups,
    numeric_steps,
    step_axis,
    step_matrix,
)
from stethoscope.report.registry import register_section
from stethoscope.run import Run


def _first_col(df: pd.DataFrame, *needles: str) -> str | None:
    for needle in needles:
        for c in df.columns:
            if c == needle:
                return c
    for needle in needles:
        for c in df.columns:
            if needle in c and pd.api.types.is_numeric_dtype(df[c]):
                return c
    return None


_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".svg", ".gif")


@register_section("attention", order=70)
def attention(run: Run) -> Section | None:
    attn = run.metrics_of("attn")
    folder = run.path / "attention"
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXT) if folder.is_dir() else []
    logs = (
        sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in (".txt", ".md", ".log", ".json", ".jsonl")
        )
        if folder.is_dir()
        else []
    )
    if attn.empty and not images and not logs:
        return None
    section = Section(
        "attention",
        "Attention",
        "Attention entropy (low: each query attends to one key) and sink share (the share of "
        "attention taken by one key position, often token 0) per layer and head.",
    )
    if not attn.empty:
        attn = numeric_steps(attn)
        head_col = next((c for c in ("head", "heads", "head_index") if c in attn), None)
        panels = []
        for needles, title, cmap in (
            (("entropy", "entropy_mean"), "entropy", "viridis"),
            (("sink_share", "sink"), "sink share", "magma"),
        ):
            col = _first_col(attn, *needles)
            if col is None:
                continue
            if head_col is not None:
                last_step = attn["step"].max()
                last = attn[(attn["step"] == last_step) & attn[head_col].notna()]
                layers = first_seen(last["name"].fillna(""))
                heads = sorted(int(h) for h in last[head_col].unique())
                if len(layers) > MAX_ROWS:  # merge neighbouring layers
                    merged = merge_groups(layers, MAX_ROWS)
                    last = last.assign(name=last["name"].map(merged))
                    layers = first_seen(merged.values())
                pivot = last.pivot_table(index="name", columns=head_col, values=col, aggfunc="mean")
                pivot = pivot.reindex(index=layers, columns=heads[:64])
                panels.append(
                    Plot(
                        f"attn-{title}",
                        f"{title.capitalize()} at step {last_step}",
                        "heatmap",
                        {
                            "matrix": pivot.to_numpy(dtype=float),
                            "rows": layers,
                            "cols": heads[:64],
                            "xlabel": "head",
                            "cbar": title,
                            "cmap": cmap,
                            "vmin": 0.0,
                            "vmax": 1.0 if "sink" in title else None,
                        },
                    )
                )
            else:
                df, groups = group_frame(attn.assign(name=attn["name"].fillna("")), MAX_ROWS)
                matrix, steps = step_matrix(df, col, groups, how="mean")
                panels.append(
                    Plot(
                        f"attn-{title}",
                        title.capitalize(),
                        "heatmap",
                        {
                            "matrix": matrix,
                            "rows": groups,
                            "cols": steps,
                            "xlabel": step_axis(steps),
                            "cbar": title,
                            "cmap": cmap,
                            "vmin": 0.0,
                            "vmax": 1.0 if "sink" in title else None,
                        },
                    )
                )
        if panels:
            section.plots.append(
                Plot(
                    "attention",
                    "Attention entropy and sink share",
                    "panels",
                    {},
                    panels=panels,
                    caption="Per layer (rows) and head (columns), averaged over query positions.",
                )
            )
        ent = _first_col(attn, "entropy", "entropy_mean")
        sink = _first_col(attn, "sink_share", "sink")
        if ent or sink:
            last_step = attn["step"].max()
            last = attn[attn["step"] == last_step]
            key = sink or ent
            top = last.sort_values(key, ascending=sink is None).head(TOP_N)
            cols = [c for c in (head_col, ent, sink) if c]
            section.tables.append(
                Table(
                    ["module", *cols],
                    [[str(r["name"]), *[fmt(r[c]) for c in cols]] for _, r in top.iterrows()],
                    caption=f"Heads with the largest sink share at step {last_step}"
                    if sink
                    else f"Heads with the lowest entropy at step {last_step}",
                    note=f"top {len(top)} of {len(last):,}" if len(last) > len(top) else "",
                    code_columns=(0,),
                )
            )
    for p in images[:MAX_IMAGES]:
        rel = p.relative_to(run.path).as_posix()
        section.plots.append(
            Plot(f"attn-img-{len(section.plots)}", rel, "image", {"path": str(p)}, caption=rel)
        )
    if len(images) > MAX_IMAGES:
        section.notes.append(
            f"{len(images) - MAX_IMAGES} more pattern picture(s) in `attention/`, not embedded."
        )
        for p in images[MAX_IMAGES : MAX_IMAGES + TOP_N]:
            section.links.append(Link(p.name, p.relative_to(run.path).as_posix()))
    for p in logs[:TOP_N]:
        section.links.append(Link(p.name, p.relative_to(run.path).as_posix()))
    if len(logs) > TOP_N:
        section.notes.append(f"{len(logs) - TOP_N} more attention log(s) in `attention/`.")
    return section
