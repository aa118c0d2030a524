"""The report's training curves section: the scalars logged with ``mon.log()``, epochs marked."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from stethoscope.report.model import Plot, Section, Table, cell, epoch_lines, spread, thin
from stethoscope.report.registry import register_section
from stethoscope.run import Run


def incident_lines(run: Run) -> list[tuple[int, str]]:
    """(step, label) where each incident with a warning or worse opened."""
    out = []
    for number, incident in enumerate(run.incidents, start=1):
        if incident.severity != "info" and incident.first_step is not None:
            out.append((int(incident.first_step), f"incident {number}: {incident.root.code}"))
    return out[:10]


def _raw_scalars(run: Run):
    """The scalars with a missing (NaN-written-as-null) value kept as NaN and every step present."""
    df = run.metrics_of("scalar")
    if df.empty or "value" not in df:
        return df
    df = df[df["step"].notna()].assign(value=pd.to_numeric(df["value"], errors="coerce"))
    df = df.drop_duplicates(["step", "name"], keep="last")  # pivot_table's "last" would skip the NaNs
    wide = df.pivot(index="step", columns="name", values="value")
    wide.index = wide.index.astype(int)
    return wide.sort_index()


def _first_nonfinite(raw, name: str) -> int | None:
    if raw is None or raw.empty or name not in raw:
        return None
    col = raw[name].to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(col))
    return int(raw.index[bad[0]]) if bad.size else None


def _logged(run: Run) -> set[tuple[int, str]]:
    """(step, name) of every scalar row written, its value a number or not."""
    df = run.metrics_of("scalar")
    if df.empty or "name" not in df:
        return set()
    df = df[df["step"].notna()]
    return set(zip(df["step"].astype(int), df["name"], strict=True))


def _cell(value: float, logged: bool) -> str:
    """``nan`` / ``inf`` for a value logged non-finite (never a blank that reads as "not logged"), ``—`` for
    one not logged at that step."""
    if logged and isinstance(value, float) and math.isnan(value):
        return "nan"
    return cell(value)


def _value(frame, step: int, col: str) -> float:
    try:
        return frame.loc[step, col]
    except KeyError:
        return float("nan")


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
    vlines = epoch_lines(run)[:40] + incident_lines(run)
    raw = _raw_scalars(run)
    panels = []
    names = [c for c in ["loss"] if c in scal] + [c for c in scal.columns if c not in ("loss",)]
    for name in names[:6]:
        col = scal[name].dropna()
        bad = _first_nonfinite(raw, name)
        if col.empty and bad is None:
            continue
        xs, ys = col.index.to_numpy(), col.to_numpy(dtype=float)
        marks = list(vlines) + ([(bad, f"{name} non-finite from here")] if bad is not None else [])
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
                    "vlines": marks[:50],
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
                caption="One panel per logged scalar; dashed lines mark epochs, the step each incident opened "
                "and the first non-finite value (a NaN or Inf cannot be drawn: the line stops there).",
            )
        )
    picks = spread(list(scal.index), 8)
    cols = list(scal.columns)[:8]
    firsts = [b for c in cols if (b := _first_nonfinite(raw, c)) is not None and b in scal.index]
    picks = sorted(set(picks) | set(firsts))
    shown = raw.reindex(index=scal.index) if not raw.empty else scal
    logged = _logged(run)
    section.tables.append(
        Table(
            ["step", *cols],
            [[str(s)] + [_cell(_value(shown, s, c), (s, c) in logged) for c in cols] for s in picks],
            caption="Logged values at up to 8 steps spread over the run",
        )
    )
    return section
