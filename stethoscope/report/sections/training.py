"""The report's training curves section: the scalars logged with ``mon.log()``, epochs marked."""

from __future__ import annotations

import numpy as np

from stethoscope.report.model import Plot, Section, Table, cell, epoch_lines, spread, thin
from stethoscope.report.registry import register_section
from stethoscope.run import Run


@register_section("training", order=30)
def training(run: Run) -> Section | None:
    scal = run.scalars()
    if scal.empty:
        return None
    scal = scal[scal.index.notna()]
    scal.index = scal.index.astype(int)
    if scal.empty:
        return None
    section = Section(
        "training",
        "Training curves",
        "The scalars logged with `mon.log()` (loss, learning rate, ...) and the global gradient "
        "norm of every sampled step.",
    )
    vlines = epoch_lines(run)
    panels = []
    names = [c for c in ["loss"] if c in scal] + [c for c in scal.columns if c not in ("loss",)]
    for name in names[:6]:
        col = scal[name].dropna()
        if col.empty:
            continue
        xs, ys = col.index.to_numpy(), col.to_numpy(dtype=float)
        keep = thin(xs)
        positive = np.isfinite(ys) & (ys > 0)
        logy = name in ("grad_norm", "lr") and positive.all() and ys[positive].max() > 20 * ys[positive].min()
        panels.append(
            Plot(
                f"scalar-{name}",
                name,
                "lines",
                {
                    "series": [(name, xs[keep], ys[keep])],
                    "xlabel": "step",
                    "ylabel": name,
                    "logy": bool(logy),
                    "vlines": vlines[:50],
                },
            )
        )
    if panels:
        section.plots.append(
            Plot(
                "training",
                "Training curves",
                "panels",
                {},
                panels=panels,
                caption="One panel per logged scalar; dashed lines mark epochs.",
            )
        )
    picks = spread(list(scal.index), 8)
    cols = list(scal.columns)[:8]
    section.tables.append(
        Table(
            ["step", *cols],
            [[str(s)] + [cell(scal.loc[s, c]) for c in cols] for s in picks],
            caption="Logged values at up to 8 steps spread over the run",
        )
    )
    return section
