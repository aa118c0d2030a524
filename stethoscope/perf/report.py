"""The report's step-time section: the mean milliseconds of each phase, per rank when distributed, from the
``perf`` metrics rows (docs/perf.md)."""

from __future__ import annotations

import numpy as np

from stethoscope.report.model import Plot, Section, Table, fmt
from stethoscope.report.registry import register_section


@register_section("perf", order=88)
def step_time(run) -> Section | None:
    df = run.metrics_of("perf")
    if df.empty or "total_ms" not in df or "steps" not in df:
        return None
    # the phase columns of the perf rows, in the order they were written (docs/run-directory.md): not the total,
    # the device-side timings or the monitor's estimated share
    cols = [c for c in df.columns if c.endswith("_ms") and c not in ("total_ms", "monitor_estimated_ms")
            and not c.startswith("device_")]
    ranks = sorted(int(r) for r in df["rank"].dropna().unique()) if "rank" in df and df["rank"].notna().any() else [None]
    rows, means = [], {}
    for r in ranks:
        part = df if r is None else df[df["rank"] == r]
        w = part["steps"].to_numpy(dtype=float)
        if w.sum() <= 0:
            continue
        m = {c: float(np.nansum(part[c].to_numpy(dtype=float) * w) / w.sum()) for c in [*cols, "total_ms"]}
        means[r] = m
        total = m["total_ms"] or float("nan")
        label = "all steps" if r is None else f"rank {r}"
        rows.append([label, *[f"{fmt(m[c])} ({100 * m[c] / total:.0f} %)" for c in cols], fmt(m["total_ms"])])
    if not rows:
        return None
    section = Section("perf", "Step time",
                      "Where a step's time goes: the mean milliseconds of each phase over the run "
                      "(docs/perf.md); `monitor` is stethoscope's own work at the step boundaries.")
    names = [c[:-3] for c in cols]
    panels = [Plot(f"perf-{'all' if r is None else r}", "all steps" if r is None else f"rank {r}", "bars",
                   {"labels": names[::-1], "values": np.array([m[c] for c in cols][::-1]), "xlabel": "ms per step"})
              for r, m in means.items()]
    section.plots.append(Plot("perf", "Time per phase", "bars", panels[0].data, panels=panels if len(panels) > 1 else []))
    # each cell: mean ms per step (share of the step); the last column is the whole step, in ms
    section.tables.append(Table(["", *[f"{n} ms" for n in names], "whole step ms"], rows))
    return section
