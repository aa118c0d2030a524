"""The report's memory section: RSS and CUDA allocated / reserved over steps, with epoch boundaries marked.

Built from the ``kind: "memory"`` rows the memory extension writes and the ``marker`` rows of ``mon.epoch``;
a ``memory.leak`` / ``memory.oom`` finding adds a note with its step, so "OOM right after the epoch
transition" (the HF field note's M-003) reads straight off the figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SERIES = (  # (column, label suffix)
    ("rss_bytes", "RSS"),
    ("peak_rss_bytes", "peak RSS"),
    ("allocated_bytes", "allocated"),
    ("reserved_bytes", "reserved"),
    ("peak_bytes", "peak allocated"),
)


def memory_section(run: Any) -> Any:
    """The memory Section, or None when the run has no memory rows in the extension's format."""
    from stethoscope.report.content import (
        MAX_LINES,
        Plot,
        Section,
        Table,
        _numeric_steps,
        fmt,
        thin,
    )

    mem = run.metrics_of("memory")
    if mem.empty or not any(col in mem for col, _ in _SERIES):
        return None
    mem = _numeric_steps(mem)
    series = []
    rows = []
    for name, part in mem.groupby(mem["name"].fillna(""), sort=False):
        part = part.sort_values("step")
        who = "process" if name == "process" else str(name)
        for col, suffix in _SERIES:
            if col not in part or part[col].notna().sum() == 0:
                continue
            sub = part[part[col].notna()]
            xs = sub["step"].to_numpy()
            ys = sub[col].astype(float).to_numpy() / 2**20
            keep = thin(xs)
            label = f"{who} {suffix}"
            series.append((label, xs[keep], ys[keep]))
            rows.append([label, fmt(float(ys[0])), fmt(float(np.nanmin(ys))), fmt(float(np.nanmax(ys))),
                         fmt(float(ys[-1])), fmt(float(ys[-1] - ys[0]))])
    if not series:
        return None
    vlines = []
    markers = run.metrics_of("marker")
    if not markers.empty and "value" in markers:
        first = int(mem["step"].min())
        for _, r in markers[markers["name"] == "epoch"].iterrows():
            known = r["step"] is not None and r["step"] == r["step"]  # None / NaN: marked before any step
            vlines.append((int(r["step"]) if known else first, f"epoch {fmt(r['value'])}"))
    section = Section(
        "memory",
        "Memory",
        "Process RSS and, on CUDA, the caching allocator's allocated / reserved / peak memory, read at the end "
        "of every step (a row every memory.every steps and on sampled steps). A line that climbs step after "
        "step is a leak; dashed lines mark epochs, so a jump or an out-of-memory error right after an epoch "
        "boundary is visible.",
    )
    section.plots.append(
        Plot("memory", "Memory over steps", "lines",
             {"series": series[:MAX_LINES], "xlabel": "step", "ylabel": "MiB", "vlines": vlines},
             caption="MiB per step; dashed lines mark epochs.")
    )
    section.tables.append(
        Table(["series", "first MiB", "min MiB", "max MiB", "last MiB", "change MiB"], rows,
              caption="Memory over the run", code_columns=(0,))
    )
    for f in run.findings:
        if f.code in ("memory.leak", "memory.oom"):
            where = "preflight" if f.first_step is None else f"step {f.first_step}"
            section.notes.append(f"{f.code} ({f.severity}) at {where}: {f.message}")
    return section
