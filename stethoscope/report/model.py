"""The report's data model and the helpers its sections share: a leaf module, importing no other part of the
report and no feature package.

A :class:`Section` holds :class:`Plot` (data plus a kind, not a matplotlib object), :class:`Table` and
:class:`Link`; a :class:`ReportContent` holds the verdict, the run's facts, the :class:`FindingRow` list and the
sections. The HTML page, the Markdown twin and the console summary all render this one model.

A huge model stays readable: tables keep the top :data:`TOP_N` rows, names are grouped by block
(:func:`layer_group`), heatmaps merge neighbouring blocks past :data:`MAX_ROWS` rows, line plots past
:data:`MAX_LINES` lines, and step series are thinned to at most :data:`MAX_POINTS` points.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stethoscope._format import format_percent, format_value

TOP_N = 15  # rows in any table
MAX_ROWS = 48  # rows in a heatmap (blocks merged beyond)
MAX_LINES = 48  # lines in a line plot (blocks merged beyond)
MAX_COLS = 160  # step columns in a heatmap (steps binned beyond)
MAX_POINTS = 1500  # points of one step series
MAX_IMAGES = 12  # captured attention pictures embedded (the rest linked)
DUMP_LINES = 40  # lines of a hang/crash dump shown inline

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
    incident: int = 0  # 1-based number of the incident it belongs to (worst incident first)
    consequence: bool = False  # it opened as a consequence of its incident's root
    reason: str = ""  # why it is a consequence (``data.caused_by.reason``)
    members: int = 0  # targets an aggregated finding stands for (0: one target)
    replay: str = ""  # for a root: the incident folder saved for `stethoscope replay` (relative to the run)
    replay_weights: str = ""  # which weights that folder holds, in words ("" when none were saved)
    replay_factory: bool = False  # the run named its model factory (incidents.factory): no --factory needed


def replay_line(row: FindingRow, run_dir: str = "RUN_DIR") -> str:
    """How to rerun an incident's step from its saved folder ("" when none was saved): the command first."""
    if not row.replay:
        return ""
    saved = "the batch, the RNG states" + (f" and {row.replay_weights}" if row.replay_weights else "")
    if row.replay_factory:
        return f"Replay it: `stethoscope replay {run_dir}/{row.replay}` — saved there: {saved}."
    return (f"Replay it: `stethoscope replay {run_dir}/{row.replay} --factory pkg.mod:fn` — saved there: {saved}; "
            "the factory builds your model (or set incidents.factory; docs/replay.md).")


TABLE_CONSEQUENCES = 3  # consequences listed under their root in a findings table (the rest counted)


@dataclass
class ReportContent:
    title: str
    verdict: str  # healthy | warning | critical
    verdict_words: str
    counts: dict[str, int]
    facts: list[tuple[str, str]]  # the run table
    findings: list[FindingRow]
    sections: list[Section]
    cause: str = ""  # the root of the worst incident, in words ("" when healthy)
    incidents: int = 0  # incidents with a warning or worse

    @property
    def counts_text(self) -> str:
        c = self.counts
        text = f"{c.get('critical', 0)} critical, {c.get('warning', 0)} warning, {c.get('info', 0)} info"
        if self.incidents:
            text += f" in {self.incidents} incident{'s' if self.incidents != 1 else ''}"
        return text

    @property
    def verdict_line(self) -> str:
        return f"{self.verdict_words} ({self.counts_text})" + (f" — cause: {self.cause}" if self.cause else "")

    def table_rows(self, shown: int = TABLE_CONSEQUENCES) -> list[FindingRow | tuple[int, int]]:
        """The findings table's rows: each root, then at most ``shown`` of its consequences; the rest of an
        incident as ``(incident number, how many more)`` — a table folds, the incident cards list them all."""
        out: list[FindingRow | tuple[int, int]] = []
        for root, consequences in self.by_incident():
            out.append(root)
            out += consequences[:shown]
            if len(consequences) > shown:
                out.append((root.incident, len(consequences) - shown))
        return out

    def by_incident(self) -> list[tuple[FindingRow, list[FindingRow]]]:
        """(root, consequences) per incident, in the order the rows come (worst incident first)."""
        out: list[tuple[FindingRow, list[FindingRow]]] = []
        for row in self.findings:
            if row.consequence and out and out[-1][0].incident == row.incident:
                out[-1][1].append(row)
            else:
                out.append((row, []))
        return out

    def plots(self) -> list[Plot]:
        return [p for s in self.sections for p in s.plots]


# ---------------------------------------------------------------------------------------------- values


def fmt(value: Any) -> str:
    """A number as a person reads it in a table: 4 significant digits, scientific when tiny or huge."""
    return format_value(value, 4)


def pct(value: Any) -> str:
    """A fraction in [0, 1] as a percentage."""
    return format_percent(value)


def cell(value: Any) -> str:
    """A table cell where NaN means "not logged at that step"."""
    return "—" if isinstance(value, float) and math.isnan(value) else fmt(value)


def top_note(shown: int, total: int, what: str) -> str:
    """``top 15 of 3,012 parameters`` when a table was cut, else empty."""
    return f"top {shown} of {total:,} {what}" if total > shown else ""


def spread(items: list, n: int) -> list:
    """At most ``n`` items spread evenly over ``items`` (the first and last kept)."""
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def thin(xs: np.ndarray, limit: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most ``limit`` points spread evenly over a series (the first and last kept)."""
    n = len(xs)
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


# -------------------------------------------------------------------------------------------- grouping


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


def first_seen(names: Iterable[str]) -> list[str]:
    """Unique names in first-seen order (the model's own order, as the metrics were written)."""
    return list(dict.fromkeys(names))


def merge_groups(groups: list[str], limit: int) -> dict[str, str]:
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


# ------------------------------------------------------------------------------------------ step frames


def numeric_steps(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that have a step, with the step as an int."""
    df = df[df["step"].notna()].copy()
    df["step"] = df["step"].astype(int)
    return df


def group_frame(df: pd.DataFrame, limit: int) -> tuple[pd.DataFrame, list[str]]:
    """Add a ``group`` column (block, merged past ``limit``); return the frame and the groups in order."""
    groups = first_seen(layer_group(n) for n in df["name"])
    # a small model reads better per module / parameter than per block
    names = first_seen(df["name"])
    if len(names) <= min(limit, 24):
        mapping = {n: n or "<model>" for n in names}
        df = df.assign(group=df["name"].map(mapping))
        return df, first_seen(mapping.values())
    merged = merge_groups(groups, limit)
    df = df.assign(group=df["name"].map(lambda n: merged[layer_group(n)]))
    return df, first_seen(merged.values())


def step_matrix(df: pd.DataFrame, column: str, rows: list[str], how: str = "max") -> tuple[np.ndarray, list]:
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


def step_spacing(steps: list) -> str:
    """How the sampled steps of a heatmap's columns are spaced, when unevenly: ``"0–9 every step, then
    50–250 every 50"`` (a column is a sampled step, not a fixed stretch of training); "" when even.

    >>> step_spacing([0, 1, 2, 3, 50, 100, 150]), step_spacing([0, 50, 100])
    ('0–3 every step, then 50–150 every 50', '')
    """
    xs = [int(x) for x in steps]
    if len(xs) < 3 or len(set(np.diff(xs).tolist())) == 1:
        return ""
    runs: list[list[int]] = [[xs[0]]]  # greedy: a run keeps the spacing of its first two steps
    for x in xs[1:]:
        run = runs[-1]
        if len(run) == 1 or x - run[-1] == run[1] - run[0]:
            run.append(x)
        else:
            runs.append([x])
    words = []
    for run in runs:
        if len(run) <= 2:
            words.append(", ".join(map(str, run)))
        else:
            d = run[1] - run[0]
            words.append(f"{run[0]}–{run[-1]} " + ("every step" if d == 1 else f"every {d}"))
    return ", then ".join(words)


def step_axis(steps: list) -> str:
    """A heatmap's x label: ``sampled step``, saying so when the columns are not evenly spaced."""
    spacing = step_spacing(steps)
    return f"sampled step (uneven: {spacing})" if spacing else "sampled step"


def nothing_to_see(matrix: np.ndarray, floor: float = 1e-3) -> bool:
    """Whether a heatmap of shares would be one flat dark colour: no cell reaches ``floor`` (0.1 %)."""
    finite = matrix[np.isfinite(matrix)] if matrix.size else matrix
    return finite.size == 0 or float(np.max(finite)) < floor


def group_lines(df: pd.DataFrame, column: str, groups: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One thinned (label, steps, values) series of ``column`` per group, in the order of ``groups``."""
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


def epoch_lines(run: Any, first_step: int | None = None) -> list[tuple[int, str]]:
    """(step, ``epoch N``) of each ``mon.epoch`` marker; a marker without a step lands on ``first_step``
    (None: such markers are left out)."""
    markers = run.metrics_of("marker")
    out: list[tuple[int, str]] = []
    if markers.empty or "value" not in markers:
        return out
    for _, r in markers[markers["name"] == "epoch"].iterrows():
        known = r["step"] is not None and r["step"] == r["step"]  # None / NaN: marked before any step
        if known:
            out.append((int(r["step"]), f"epoch {fmt(r['value'])}"))
        elif first_step is not None:
            out.append((first_step, f"epoch {fmt(r['value'])}"))
    return out
