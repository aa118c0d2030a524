"""The report's memory section: RSS and CUDA allocated / reserved over steps, with epoch boundaries marked.

Built from the ``kind: "memory"`` rows the memory extension writes and the ``marker`` rows of ``mon.epoch``;
a ``memory.leak`` / ``memory.oom`` finding adds a note with its step, so "OOM right after the epoch
transition" (the HF field note's M-003) reads straight off the figure. Memory rows in another format (a
memory monitor of one's own) are shown column by column.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from stethoscope.report.model import (
    MAX_LINES,
    TOP_N,
    Plot,
    Section,
    Table,
    epoch_lines,
    fmt,
    numeric_steps,
    thin,
)
from stethoscope.report.registry import register_section
from stethoscope.run import Run

_SERIES = (  # (column, label suffix)
    ("rss_bytes", "RSS"),
    ("peak_rss_bytes", "peak RSS"),
    ("allocated_bytes", "allocated"),
    ("reserved_bytes", "reserved"),
    ("peak_bytes", "peak allocated"),
)


@register_section("memory", order=80)
def memory(run: Run) -> Section | None:
    """The memory extension's section (docs/memory.md), else the rows' numeric columns, else None."""
    section = memory_section(run)
    if section is not None:
        return section
    return _any_memory_section(run)


def memory_section(run: Run) -> Section | None:
    """The memory Section, or None when the run has no memory rows in the extension's format."""
    mem = run.metrics_of("memory")
    if mem.empty or not any(col in mem for col, _ in _SERIES):
        return None
    mem = numeric_steps(mem)
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
    vlines = epoch_lines(run, first_step=int(mem["step"].min()))  # unstepped markers: at the first step
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


_MEMORY_SKIP = {"schema_version", "step", "kind", "name", "rank", "calls"}


def _any_memory_section(run: Run) -> Section | None:
    """Memory rows in any other format: every numeric column over the steps, bytes in MiB."""
    mem = run.metrics_of("memory")
    if mem.empty:
        return None
    mem = numeric_steps(mem)
    series_by_unit: dict[str, list] = {}
    cols = [c for c in mem.columns if c not in _MEMORY_SKIP and pd.api.types.is_numeric_dtype(mem[c])]
    for name, part in mem.groupby(mem["name"].fillna(""), sort=False):
        part = part.sort_values("step")
        for col in cols:
            values = part[col].astype(float)
            if values.notna().sum() == 0:
                continue
            label = col if col == "value" or not name else f"{name} {col}"
            if col == "value":
                label = name or "value"
            ys = values.to_numpy()
            xs = part["step"].to_numpy()
            bytes_like = "byte" in col.lower() or "byte" in str(name).lower() or np.nanmax(np.abs(ys)) > 1e7
            if bytes_like and not any(
                u in col.lower() for u in ("mb", "mib", "gb", "gib", "frac", "percent")
            ):
                ys, unit = ys / 2**20, "MiB"
            elif "frac" in col.lower() or "percent" in col.lower():
                unit = "fraction" if "frac" in col.lower() else "%"
            else:
                unit = next((u for u in ("MiB", "MB", "GiB", "GB") if u.lower() in col.lower()), "value")
            keep = thin(xs)
            series_by_unit.setdefault(unit, []).append((label, xs[keep], ys[keep]))
    if not series_by_unit:
        return None
    section = Section(
        "memory",
        "Memory",
        "Memory at each step as the memory monitor recorded it; a line that "
        "climbs step after step is a leak (tensors kept alive across steps).",
    )
    panels = [
        Plot(f"memory-{i}", unit, "lines", {"series": s[:MAX_LINES], "xlabel": "step", "ylabel": unit})
        for i, (unit, s) in enumerate(series_by_unit.items())
    ]
    section.plots.append(Plot("memory", "Memory over steps", "panels", {}, panels=panels[:3]))
    last_step = mem["step"].max()
    last = mem[mem["step"] == last_step]

    def cell(col: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        if "byte" in col.lower() or (isinstance(value, int | float) and abs(value) > 1e7):
            return f"{value / 2**20:,.1f} MiB"
        return fmt(value)

    section.tables.append(
        Table(
            ["name", *cols[:6]],
            [[str(r["name"]), *[cell(c, r[c]) for c in cols[:6]]] for _, r in last.head(TOP_N).iterrows()],
            caption=f"Memory at step {last_step}",
            code_columns=(0,),
        )
    )
    return section
