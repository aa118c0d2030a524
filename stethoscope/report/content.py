"""What the report says, computed once from a :class:`~stethoscope.run.Run`.

One model of the report — verdict, run facts, findings, and the sections that have data — shared by the
HTML page, the Markdown twin and the console summary, so the three never disagree. Computing is kept apart
from drawing (``plots.py``) and from writing (``html.py``, ``markdown.py``): a :class:`Plot` here is data
plus a kind, not a matplotlib object.

A huge model stays readable: tables keep the top :data:`TOP_N` rows, names are grouped by block
(:func:`layer_group`), heatmaps merge neighbouring blocks past :data:`MAX_ROWS` rows, line plots past
:data:`MAX_LINES` lines, and step series are thinned to at most :data:`MAX_POINTS` points.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stethoscope._format import format_float
from stethoscope.run import Finding, Run

TOP_N = 15  # rows in any table
MAX_ROWS = 48  # rows in a heatmap (blocks merged beyond)
MAX_LINES = 48  # lines in a line plot (blocks merged beyond)
MAX_COLS = 160  # step columns in a heatmap (steps binned beyond)
MAX_POINTS = 1500  # points of one step series
MAX_IMAGES = 12  # captured attention pictures embedded (the rest linked)
DUMP_LINES = 40  # lines of a hang/crash dump shown inline

VERDICT_WORDS = {
    "healthy": "healthy — no warning or critical finding",
    "warning": "warning — something needs a look",
    "critical": "critical — training is likely broken",
}

# Names under which models keep their repeated blocks: ``transformer.h.3``, ``model.layers.3``,
# ``encoder.layer.3``, ``blocks.3``, ...
CONTAINERS = frozenset(
    {
        "h",
        "layers",
        "layer",
        "blocks",
        "block",
        "encoder_layers",
        "decoder_layers",
        "resblocks",
        "stages",
        "stage",
        "levels",
        "transformer_blocks",
        "decoder",
        "encoder",
    }
)
_PARAM_LEAVES = frozenset({"weight", "bias", "in_proj_weight", "in_proj_bias", "out_proj_weight"})


# ---------------------------------------------------------------------------------------------- helpers


def fmt(value: Any) -> str:
    """A number as a person reads it in a table: 4 significant digits, scientific when tiny or huge."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return format_float(float(value), 4)
    return str(value)


def pct(value: Any) -> str:
    """A fraction in [0, 1] as a percentage."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(v) else f"{100 * v:.1f} %"


def when(f: Finding) -> str:
    start = "preflight" if f.first_step is None else f"step {f.first_step}"
    if f.cleared_step is not None:
        return f"{start} → cleared at step {f.cleared_step}"
    return f"{start} → still open"


def layer_group(name: str) -> str:
    """The block a module or parameter name belongs to, for grouping a big model by layer.

    The prefix up to the first integer component that follows a known container name (``h``, ``layers``,
    ``layer``, ``blocks``, ...); otherwise the first two components. A parameter's own leaf (``weight``,
    ``bias``) is dropped first, so a parameter lands in its module's block.

    >>> layer_group("transformer.h.3.attn.c_attn.weight"), layer_group("model.layers.12.mlp")
    ('transformer.h.3', 'model.layers.12')
    >>> layer_group("encoder.layer.0.attention.self.query.bias"), layer_group("lm_head.weight")
    ('encoder.layer.0', 'lm_head')
    """
    if not name:
        return "<model>"
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in _PARAM_LEAVES:
        parts = parts[:-1]
    for i in range(1, len(parts)):
        if parts[i].isdigit() and parts[i - 1] in CONTAINERS:
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def _order(names: Iterable[str]) -> list[str]:
    """Unique names in first-seen order (the model's own order, as the metrics were written)."""
    return list(dict.fromkeys(names))


def _merge_groups(groups: list[str], limit: int) -> dict[str, str]:
    """Map each group to a row label; past ``limit`` groups, neighbours are merged (``h.0 … h.3``)."""
    if len(groups) <= limit:
        return {g: g for g in groups}
    size = math.ceil(len(groups) / limit)
    out = {}
    for i in range(0, len(groups), size):
        chunk = groups[i : i + size]
        label = chunk[0] if len(chunk) == 1 else f"{chunk[0]} … {_short_tail(chunk[0], chunk[-1])}"
        for g in chunk:
            out[g] = label
    return out


def _short_tail(first: str, last: str) -> str:
    """``transformer.h.0`` … ``transformer.h.3`` is shown as ``transformer.h.0 … 3``."""
    a, b = first.split("."), last.split(".")
    if len(a) == len(b) and a[:-1] == b[:-1]:
        return b[-1]
    return last


def thin(xs: np.ndarray, limit: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most ``limit`` points spread evenly over a series (the first and last kept)."""
    n = len(xs)
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


_HEAD = {"zero_fraction": "zero fraction", "update_norm": "‖Δw‖", "weight_norm": "‖w‖", "ratio": "‖Δw‖ / ‖w‖"}


def _top_note(shown: int, total: int, what: str) -> str:
    return f"top {shown} of {total:,} {what}" if total > shown else ""


def _cell(value: Any) -> str:
    """A table cell where NaN means "not logged at that step"."""
    return "—" if isinstance(value, float) and math.isnan(value) else fmt(value)


def spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


# ------------------------------------------------------------------------------------------------ model


@dataclass
class Plot:
    """A figure as data. ``kind``: ``lines``, ``heatmap``, ``bars`` or ``image`` (a PNG file to embed).

    ``data`` by kind — lines: ``series`` [(label, xs, ys)], ``xlabel``, ``ylabel``, ``logy``, ``hlines``
    [(y, label)], ``vlines`` [(x, label)], ``colorbar`` (label: colour lines by depth instead of a legend);
    heatmap: ``matrix`` (rows × cols, NaN = no data), ``rows``, ``cols``, ``xlabel``, ``cbar``, ``vmin``,
    ``vmax``, ``cmap``; bars: ``labels``, ``values``, ``xlabel``; image: ``path``.
    """

    id: str
    title: str
    kind: str
    data: dict
    caption: str = ""
    panels: list[Plot] = field(default_factory=list)  # side-by-side sub-plots drawn as one figure


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    note: str = ""  # e.g. "top 15 of 3,012 parameters"
    code_columns: tuple[int, ...] = ()  # columns holding names (monospace)


@dataclass
class Link:
    label: str
    path: str  # relative to the run directory
    excerpt: str = ""  # first lines, shown inline


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    plots: list[Plot] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class FindingRow:
    severity: str
    code: str
    target: str
    value: str
    threshold: str
    started: str
    cleared: str
    when: str
    message: str
    hint: str


@dataclass
class ReportContent:
    title: str
    verdict: str  # healthy | warning | critical
    verdict_words: str
    counts: dict[str, int]
    facts: list[tuple[str, str]]  # the run table
    findings: list[FindingRow]
    sections: list[Section]

    @property
    def counts_text(self) -> str:
        c = self.counts
        return f"{c.get('critical', 0)} critical, {c.get('warning', 0)} warning, {c.get('info', 0)} info"

    @property
    def verdict_line(self) -> str:
        return f"{self.verdict_words} ({self.counts_text})"

    def plots(self) -> list[Plot]:
        return [p for s in self.sections for p in s.plots]


def finding_rows(run: Run) -> list[FindingRow]:
    """The findings, most severe first, as the report, ``stethoscope findings`` and the summary show them."""
    rows = []
    for f in run.findings:
        rows.append(
            FindingRow(
                severity=f.severity,
                code=f.code,
                target=(f.target or "—") + (f" (rank {f.rank})" if f.rank is not None else ""),
                value=fmt(f.worst_value),
                threshold=fmt(f.threshold),
                started="preflight" if f.first_step is None else str(f.first_step),
                cleared="still open" if f.cleared_step is None else str(f.cleared_step),
                when=when(f),
                message=f.message or "",
                hint=f.hint or "",
            )
        )
    return rows


def verdict_of(run: Run) -> tuple[str, str, dict]:
    v = run.verdict
    return v["status"], VERDICT_WORDS.get(v["status"], v["status"]), v["counts"]


def build(run: Run, findings_only: bool = False) -> ReportContent:
    """The report's content for ``run``; ``findings_only`` skips the sections (for the console)."""
    status, words, counts = verdict_of(run)
    content = ReportContent(
        title=f"stethoscope report — {run.path.name}",
        verdict=status,
        verdict_words=words,
        counts=counts,
        facts=[] if findings_only else _facts(run),
        findings=finding_rows(run),
        sections=[],
    )
    if findings_only:
        return content
    for builder in SECTION_BUILDERS:
        try:
            section = builder(run)
        except Exception as exc:  # one section's bad data must not cost the whole report
            section = Section(
                id=builder.__name__.strip("_"),
                title=builder.__name__.strip("_").replace("_", " "),
                notes=[f"this section could not be computed: {type(exc).__name__}: {exc}"],
            )
        if section is not None:
            content.sections.append(section)
    return content


# ------------------------------------------------------------------------------------------------- facts


def _duration(meta: dict) -> str | None:
    try:
        start = datetime.fromisoformat(meta["started_at"])
        end = datetime.fromisoformat(meta["ended_at"])
    except (KeyError, TypeError, ValueError):
        return None
    seconds = (end - start).total_seconds()
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _sampled_steps(run: Run) -> list:
    df = run.metrics
    if df.empty or "kind" not in df:
        return []
    rows = df[df["kind"].isin(["act", "grad", "update", "input"])]
    return sorted(rows["step"].dropna().unique().tolist())


def _facts(run: Run) -> list[tuple[str, str]]:
    meta = run.meta
    model = meta.get("model") or {}
    versions = meta.get("versions") or {}
    facts = [("status", str(meta.get("status", "unknown")))]
    if model:
        facts.append(
            (
                "model",
                f"{model.get('class', '?')} — {model.get('parameters', 0):,} parameters "
                f"({model.get('trainable_parameters', 0):,} trainable), "
                f"{model.get('modules', '?')} modules"
                + (f", {', '.join(model['dtypes'])}" if model.get("dtypes") else "")
                + (f" on {', '.join(model['devices'])}" if model.get("devices") else ""),
            )
        )
    opt = meta.get("optimizer") or {}
    if opt:
        groups = opt.get("groups") or []
        lrs = sorted({g.get("lr") for g in groups if isinstance(g.get("lr"), int | float)})
        facts.append(
            (
                "optimizer",
                f"{opt.get('class', '?')}, {len(groups)} group(s)"
                + (f", lr {', '.join(fmt(x) for x in lrs)}" if lrs else ""),
            )
        )
    sampled = _sampled_steps(run)
    steps = meta.get("last_step")
    if steps is not None:
        facts.append(
            ("steps", f"last step {steps}" + (f"; {len(sampled)} sampled step(s)" if sampled else ""))
        )
    dur = _duration(meta)
    facts.append(("duration", (dur + ", " if dur else "") + f"started {meta.get('started_at', '?')}"))
    if meta.get("world_size") and meta.get("world_size") != 1:
        facts.append(("ranks", str(meta.get("world_size"))))
    if versions:
        facts.append(
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "platform"))
        )
    if meta.get("schedule"):
        facts.append(("sampling", str(meta["schedule"])))
    if meta.get("error"):
        facts.append(("error", str(meta["error"])))
    return facts


# ---------------------------------------------------------------------------------------------- sections


def _numeric_steps(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df["step"].notna()].copy()
    df["step"] = df["step"].astype(int)
    return df


def _group_frame(df: pd.DataFrame, limit: int) -> tuple[pd.DataFrame, list[str]]:
    """Add a ``group`` column (block, merged past ``limit``); return the frame and the groups in order."""
    groups = _order(layer_group(n) for n in df["name"])
    # a small model reads better per module / parameter than per block
    names = _order(df["name"])
    if len(names) <= min(limit, 24):
        mapping = {n: n or "<model>" for n in names}
        df = df.assign(group=df["name"].map(mapping))
        return df, _order(mapping.values())
    merged = _merge_groups(groups, limit)
    df = df.assign(group=df["name"].map(lambda n: merged[layer_group(n)]))
    return df, _order(merged.values())


def _step_matrix(df: pd.DataFrame, column: str, rows: list[str], how: str = "max") -> tuple[np.ndarray, list]:
    """rows × steps matrix of ``column`` aggregated per (group, step); steps binned past MAX_COLS."""
    pivot = df.pivot_table(index="group", columns="step", values=column, aggfunc=how)
    pivot = pivot.reindex(index=rows)
    steps = list(pivot.columns)
    matrix = pivot.to_numpy(dtype=float)
    if len(steps) > MAX_COLS:
        edges = np.linspace(0, len(steps), MAX_COLS + 1).round().astype(int)
        cols = []
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for a, b in itertools.pairwise(edges):
                block = matrix[:, a:b]
                cols.append(np.nanmax(block, axis=1) if how == "max" else np.nanmean(block, axis=1))
        matrix = np.stack(cols, axis=1)
        steps = [steps[a] for a in edges[:-1]]
    return matrix, steps


def _lines(df: pd.DataFrame, column: str, groups: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    series = []
    for g, part in df.groupby("group", sort=False):
        part = part.dropna(subset=[column]).sort_values("step")
        if part.empty:
            continue
        xs, ys = part["step"].to_numpy(), part[column].to_numpy(dtype=float)
        keep = thin(xs)
        series.append((str(g), xs[keep], ys[keep]))
    order = {g: i for i, g in enumerate(groups)}
    return sorted(series, key=lambda s: order.get(s[0], 1 << 30))


def _training(run: Run) -> Section | None:
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
    markers = run.metrics_of("marker")
    vlines = []
    if not markers.empty and "value" in markers:
        for _, r in markers[markers["name"] == "epoch"].iterrows():
            if pd.notna(r["step"]):
                vlines.append((int(r["step"]), f"epoch {fmt(r['value'])}"))
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
            [[str(s)] + [_cell(scal.loc[s, c]) for c in cols] for s in picks],
            caption="Logged values at up to 8 steps spread over the run",
        )
    )
    return section


def _gradients(run: Run) -> Section | None:
    grads = run.metrics_of("grad")
    if grads.empty:
        return None
    grads = _numeric_steps(grads)
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
        df, groups = _group_frame(present, MAX_LINES)
        # a block's norm is the L2 norm over its parameters: sqrt(sum of squared norms)
        sq = df.assign(sq=df["norm"].astype(float) ** 2).groupby(["group", "step"], sort=False)["sq"].sum()
        agg = sq.pow(0.5).rename("norm").reset_index()
        series = _lines(agg, "norm", groups)
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
            matrix, steps = _step_matrix(agg, "zero_fraction", groups, how="max")
            section.plots.append(
                Plot(
                    "grad-zero",
                    "Zero-gradient fraction, layer × step",
                    "heatmap",
                    {
                        "matrix": matrix,
                        "rows": groups,
                        "cols": steps,
                        "xlabel": "sampled step",
                        "cbar": "zero fraction",
                        "vmin": 0.0,
                        "vmax": 1.0,
                        "cmap": "magma",
                    },
                    caption="Share of gradient entries that are (near) zero. Rows turning bright from left to right "
                    "are the picture of progressive gradient death.",
                )
            )
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
                        note=_top_note(len(dead), int((last["zero_fraction"] > 0.05).sum()), "parameters"),
                        code_columns=(0,),
                    )
                )
    if not missing.empty:
        names = _order(missing["name"])
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


def _activations(run: Run) -> Section | None:
    acts = run.metrics_of("act")
    if acts.empty:
        return None
    acts = _numeric_steps(acts)
    acts = acts.assign(name=acts["name"].fillna(""))
    section = Section(
        "activations",
        "Activations",
        "Module outputs at the sampled steps: the share of entries beyond the saturation bound and "
        "the share of features that are zero for every input (dead units), worst module per "
        "block.",
    )
    if "dead_features" in acts:
        # dead_features is a count of features; the share of the output's features reads across layers
        feats = acts["features"].astype(float) if "features" in acts else pd.Series(np.nan, index=acts.index)
        acts = acts.assign(dead_fraction=acts["dead_features"].astype(float) / feats.where(feats > 0))
    df, groups = _group_frame(acts, MAX_ROWS)
    panels = []
    for col, title, cmap in (
        ("saturation_fraction", "saturated entries", "viridis"),
        ("dead_fraction", "dead features", "magma"),
    ):
        if col not in df or df[col].notna().sum() == 0:
            continue
        matrix, steps = _step_matrix(df, col, groups, how="max")
        panels.append(
            Plot(
                f"act-{col}",
                title.capitalize(),
                "heatmap",
                {
                    "matrix": matrix,
                    "rows": groups,
                    "cols": steps,
                    "xlabel": "sampled step",
                    "cbar": "fraction",
                    "vmin": 0.0,
                    "vmax": max(0.05, float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 1.0),
                    "cmap": cmap,
                },
            )
        )
    if panels:
        section.plots.append(
            Plot(
                "activations",
                "Saturation and dead features per layer",
                "panels",
                {},
                panels=panels,
                caption="Left: share of output entries with |x| above the "
                "saturation bound. Right: share of output features zero for every input row. "
                "Worst module of each row, per sampled step.",
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


def _updates(run: Run) -> Section | None:
    ups = run.metrics_of("update")
    if ups.empty or "ratio" not in ups:
        return None
    ups = _numeric_steps(ups)
    section = Section(
        "updates",
        "Update-to-weight ratios",
        "‖Δw‖ / ‖w‖ of each optimizer step. Around 1e-3 is the usual healthy value; far above, the "
        "learning rate is too high for that block; far below, it barely moves. With Adam it sits "
        "near lr / rms(w).",
    )
    if {"update_norm", "weight_norm"} <= set(ups.columns):
        df, groups = _group_frame(ups, MAX_LINES)
        g = df.assign(u2=df["update_norm"].astype(float) ** 2, w2=df["weight_norm"].astype(float) ** 2)
        g = g.groupby(["group", "step"], sort=False)[["u2", "w2"]].sum()
        agg = (g["u2"].pow(0.5) / g["w2"].pow(0.5).where(g["w2"] > 0)).rename("ratio").reset_index()
    else:
        df, groups = _group_frame(ups, MAX_LINES)
        agg = df.groupby(["group", "step"], sort=False)["ratio"].median().reset_index()
    series = _lines(agg, "ratio", groups)
    if series:
        section.plots.append(
            Plot(
                "update-ratio",
                "Update-to-weight ratio per layer",
                "lines",
                {
                    "series": series,
                    "xlabel": "sampled step",
                    "ylabel": "‖Δw‖ / ‖w‖",
                    "logy": True,
                    "hlines": [(1e-3, "1e-3")],
                    "colorbar": "depth" if len(series) > 10 else None,
                },
                caption="Per block: ‖Δw‖ / ‖w‖ over the block's parameters (log scale); the dotted line is 1e-3.",
            )
        )
    last_step = ups["step"].max()
    last = ups[(ups["step"] == last_step) & ups["ratio"].notna()]
    if not last.empty:
        med = float(last["ratio"].median())
        # the ones furthest from the typical ratio, in decades
        key = (np.log10(last["ratio"].astype(float).clip(lower=1e-30)) - math.log10(max(med, 1e-30))).abs()
        top = last.assign(_k=key).sort_values("_k", ascending=False).head(TOP_N)
        cols = [c for c in ("ratio", "update_norm", "weight_norm") if c in top]
        section.tables.append(
            Table(
                ["parameter", *[_HEAD.get(c, c) for c in cols]],
                [[r["name"], *[fmt(r[c]) for c in cols]] for _, r in top.iterrows()],
                caption=f"Ratios furthest from the median ({fmt(med)}) at step {last_step}",
                note=f"top {len(top)} of {len(last):,} parameters" if len(last) > len(top) else "",
                code_columns=(0,),
            )
        )
    return section if section.plots or section.tables else None


_MEMORY_SKIP = {"schema_version", "step", "kind", "name", "rank", "calls"}


def _memory(run: Run) -> Section | None:
    from stethoscope.memory.report import memory_section  # the memory monitor's rows (docs/memory.md)

    section = memory_section(run)
    if section is not None:
        return section
    mem = run.metrics_of("memory")
    if mem.empty:
        return None
    mem = _numeric_steps(mem)
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
    from stethoscope import rundir as rd

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


def _timing(run: Run) -> Section | None:
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
            note=_top_note(len(top), len(per), "modules"),
            code_columns=(0,),
        )
    )
    return section


def _read_records(path: Path) -> pd.DataFrame | None:
    import json

    from stethoscope import rundir as rd

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


def _attention(run: Run) -> Section | None:
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
        attn = _numeric_steps(attn)
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
                layers = _order(last["name"].fillna(""))
                heads = sorted(int(h) for h in last[head_col].unique())
                if len(layers) > MAX_ROWS:  # merge neighbouring layers
                    merged = _merge_groups(layers, MAX_ROWS)
                    last = last.assign(name=last["name"].map(merged))
                    layers = _order(merged.values())
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
                df, groups = _group_frame(attn.assign(name=attn["name"].fillna("")), MAX_ROWS)
                matrix, steps = _step_matrix(df, col, groups, how="mean")
                panels.append(
                    Plot(
                        f"attn-{title}",
                        title.capitalize(),
                        "heatmap",
                        {
                            "matrix": matrix,
                            "rows": groups,
                            "cols": steps,
                            "xlabel": "step",
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


def _dumps(run: Run) -> Section | None:
    files = []
    for d in [run.path, *run.rank_dirs]:
        files += sorted(d.glob("hang-*.txt")) + sorted(d.glob("crash-*.txt"))
    if not files:
        return None
    section = Section(
        "dumps",
        "Hang and crash dumps",
        "What the hang watchdog and the flight recorder wrote: where each thread was, and the last "
        "events before the crash. The first lines are shown; the link opens the whole file.",
    )
    for p in files[:TOP_N]:
        try:
            with open(p, encoding="utf-8", errors="replace") as fh:
                head = [next(fh, None) for _ in range(DUMP_LINES + 1)]
        except OSError:
            head = []
        head = [h.rstrip("\n") for h in head if h is not None]
        excerpt = "\n".join(head[:DUMP_LINES]) + ("\n…" if len(head) > DUMP_LINES else "")
        section.links.append(Link(p.name, p.relative_to(run.path).as_posix(), excerpt))
    if len(files) > TOP_N:
        section.notes.append(f"{len(files) - TOP_N} more dump(s) in the run directory.")
    return section


def _preflight(run: Run) -> Section | None:
    from stethoscope.checks.report import preflight_section

    return preflight_section(run)


SECTION_BUILDERS: list[Callable[[Run], Section | None]] = [
    _dumps,
    _preflight,
    _training,
    _gradients,
    _activations,
    _updates,
    _attention,
    _memory,
    _timing,
]

_SLUG = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-") or "plot"
