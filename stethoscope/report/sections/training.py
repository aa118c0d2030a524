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


class _Logged:
    """The scalar rows as written, read once: a wide frame (NaN both where a value was logged non-finite and
    where nothing was logged), which (step, name) were logged, and each name's first non-finite step."""

    def __init__(self, run: Run):
        df = run.metrics_of("scalar")
        self.wide = pd.DataFrame()
        self.cells: set[tuple[int, str]] = set()
        self.first_bad: dict[str, int] = {}
        if df.empty or "value" not in df:
            return
        df = df[df["step"].notna()].assign(value=pd.to_numeric(df["value"], errors="coerce"))
        df = df.drop_duplicates(["step", "name"], keep="last")  # pivot_table's "last" would skip the NaNs
        steps = df["step"].astype(int)
        self.cells = set(zip(steps, df["name"], strict=True))
        bad = df[~np.isfinite(df["value"].to_numpy(dtype=float))]
        for name, step in zip(bad["name"], bad["step"].astype(int), strict=True):
            self.first_bad[name] = min(step, self.first_bad.get(name, step))
        self.wide = df.assign(step=steps).pivot(index="step", columns="name", values="value").sort_index()


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
    logged = _Logged(run)
    panels = []
    names = [c for c in ["loss"] if c in scal] + [c for c in scal.columns if c not in ("loss",)]
    for name in names[:6]:
        col = scal[name].dropna()
        bad = logged.first_bad.get(name)
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
    firsts = [b for c in cols if (b := logged.first_bad.get(c)) is not None and b in scal.index]
    picks = sorted(set(picks) | set(firsts))
    shown = logged.wide.reindex(index=scal.index) if not logged.wide.empty else scal
    section.tables.append(
        Table(
            ["step", *cols],
            [[str(s)] + [_cell(_value(shown, s, c), (s, c) in logged.cells) for c in cols] for s in picks],
            caption="Logged values at up to 8 steps spread over the run",
        )
    )
    return section
