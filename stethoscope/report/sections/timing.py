"""The report's slowest-modules section: where the time goes, from the monitor's profile (``profile.json``), a
traced forward pass (``trace.jsonl``) or ``timing`` rows, slowest first."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stethoscope import rundir as rd
from stethoscope.report.model import TOP_N, Plot, Section, Table, fmt, top_note
from stethoscope.report.registry import register_section
from stethoscope.run import Run

_TIME_KINDS = ("time", "timing", "profile")
# the first present is the measure; self time (without child modules) says where the time really goes
_TIME_COLUMNS = (
    "self_ms_per_step",
    "self_ms",
    "total_ms_per_step",
    "total_ms",
    "mean_ms",
    "ms",
    "time_ms",
    "duration_ms",
    "seconds",
    "total_s",
    "mean_s",
    "time_s",
    "duration_s",
    "value",
)
_TIME_EXTRA = ("total_ms_per_step", "total_ms", "calls_per_step", "calls")
_TIME_SOURCES = {
    "profile.json": "the monitor's per-module profile of the sampled steps",
    "trace.jsonl": "a traced forward pass",
}


def _trace_times(path: Path) -> pd.DataFrame | None:
    """Per module self and total milliseconds and calls from ``trace.jsonl``'s exit events."""
    child: dict[int, float] = {}  # depth -> time of the exited children of the open call at depth - 1
    rows = []
    for ev in rd.read_jsonl(path):
        if ev.get("event") != "exit" or not isinstance(ev.get("ms"), int | float):
            continue
        depth = int(ev.get("depth") or 0)
        ms = float(ev["ms"])
        rows.append(
            {
                "name": ev.get("name") or "",
                "self_ms": max(0.0, ms - child.pop(depth + 1, 0.0)),
                "total_ms": ms,
            }
        )
        child[depth] = child.get(depth, 0.0) + ms
    if not rows:
        return None
    df = pd.DataFrame(rows)
    return (
        df.groupby("name", sort=False)
        .agg(self_ms=("self_ms", "sum"), total_ms=("total_ms", "sum"), calls=("total_ms", "size"))
        .reset_index()
    )


def _timing_frame(run: Run) -> tuple[pd.DataFrame | None, str]:
    for fname in ("profile.json", "timing.json"):
        if (run.path / fname).is_file():
            df = _read_records(run.path / fname)
            if df is not None and not df.empty and "name" in df:
                return df, fname
    if (run.path / "trace.jsonl").is_file():
        df = _trace_times(run.path / "trace.jsonl")
        if df is not None:
            return df, "trace.jsonl"
    frames = [f for f in (run.metrics_of(k) for k in _TIME_KINDS) if not f.empty]
    if frames:
        return pd.concat(frames, ignore_index=True), "metrics.jsonl"
    return None, ""


@register_section("timing", order=90)
def timing(run: Run) -> Section | None:
    df, source = _timing_frame(run)
    if df is None or df.empty or "name" not in df:
        return None
    col = next(
        (c for c in _TIME_COLUMNS if c in df and pd.to_numeric(df[c], errors="coerce").notna().any()), None
    )
    if col is None:
        return None
    seconds = col.endswith("_s") or col == "seconds"
    unit = "value" if col == "value" else "ms"
    names = df["name"].fillna("").replace("", "<model>")
    cols = [col] + [c for c in _TIME_EXTRA if c in df and c != col]
    per = (
        pd.DataFrame(
            {
                c: pd.to_numeric(df[c], errors="coerce") * (1000.0 if seconds and c == col else 1.0)
                for c in cols
            }
        )
        .groupby(names, sort=False)
        .mean()
    )
    per = per[per[col].notna()].sort_values(col, ascending=False)
    if per.empty:
        return None
    top = per.head(TOP_N)
    label = col.replace("_", " ") if unit == "ms" and not seconds else f"{col} (ms)" if seconds else col
    section = Section(
        "timing",
        "Slowest modules",
        f"Where the time goes, from {_TIME_SOURCES.get(source, source)} (`{source}`): "
        f"`{col}` per module, slowest first."
        + (" Self time excludes child modules." if col.startswith("self") else ""),
    )
    section.plots.append(
        Plot(
            "timing",
            "Slowest modules",
            "bars",
            {"labels": list(top.index)[::-1], "values": top[col].to_numpy()[::-1], "xlabel": label},
        )
    )
    section.tables.append(
        Table(
            ["module", *[c.replace("_", " ") for c in cols]],
            [[n, *[fmt(r[c]) for c in cols]] for n, r in top.iterrows()],
            note=top_note(len(top), len(per), "modules"),
            code_columns=(0,),
        )
    )
    return section


def _read_records(path: Path) -> pd.DataFrame | None:
    try:
        if path.suffix == ".jsonl":
            return pd.DataFrame.from_records(list(rd.read_jsonl(path)))
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict):
        for key in ("modules", "records", "rows"):
            if isinstance(data.get(key), list):
                return pd.DataFrame.from_records(data[key])
            if isinstance(data.get(key), dict):
                return pd.DataFrame({"name": list(data[key]), "value": list(data[key].values())})
        return None
    if isinstance(data, list):
        return pd.DataFrame.from_records([d for d in data if isinstance(d, dict)])
    return None
