"""``stethoscope compare RUN_A RUN_B``: where two monitored runs part ways.

Two run directories are read with :func:`stethoscope.load_run`; their ``meta.json`` differences (config,
versions, model and optimizer summary) come first. Every recorded series — a logged scalar, or one statistic
of one module's activations / inputs / attention or one parameter's gradient / update, keyed by
``(kind, name, output, statistic)`` — is aligned by step over the steps both runs recorded. A series **parts
ways** at the first step ``t`` where

    |a_t - b_t| > max(atol, rtol * max(|a_t|, |b_t|), sigmas * noise_t)

or where one value is finite and the other not. ``noise_t`` is the series' own step-to-step noise before
``t``: ``1.4826 * median(|Δx|)`` over both runs' first differences at earlier steps (0 until three are
known), so two runs that drift apart within their usual step-to-step wobble (GPU non-determinism, a
different data order) are not called apart at the first ulp, and two runs with the same seed, bit-identical
until a change, part ways exactly where the change is. Memory readings (``kind = memory``) are not compared:
they differ between any two processes.

The **step** is the earliest step any series parts ways. The **module** is where the difference is born:
of the activation series, ordered by step and then by run A's recording order (the order the modules
finished: a child before its parent), the first whose module's recorded inputs had not parted ways by then.
A child fed a value its parent's own forward computed (``c_proj`` after an in-forward division by zero) has
differing inputs, so its parent — the next to finish — is named, as ``numerics.nonfinite`` names it.
Without activation rows it is the first module or parameter series (activations, inputs, attention,
gradients, updates, in that order) to part ways.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stethoscope.errors import CompareError

RTOL = 1e-5
ATOL = 1e-12
SIGMAS = 5.0
_KIND_ORDER = {"scalar": 0, "act": 1, "input": 2, "attn": 3, "grad": 4, "update": 5}
_NOT_STATS = {"schema_version", "step", "kind", "name", "output", "calls", "count", "features", "rank"}
_META_SKIP = ("started_at", "ended_at", "last_step", "status", "verdict", "schema_version", "merged",
              "missing_ranks")


@dataclass
class Split:
    """One series at the first step it parts ways."""

    kind: str
    name: str
    stat: str
    output: str
    step: int
    a: float
    b: float
    threshold: float  # what |a - b| had to exceed there
    noise: float  # the series' step-to-step noise before that step

    @property
    def where(self) -> str:
        name = self.name or "<model>"
        return f"{name}{'.' + self.output if self.output else ''}" if self.kind != "scalar" else self.name

    def as_dict(self) -> dict:
        return {k: _json(v) for k, v in self.__dict__.items()} | {"where": self.where}


def _json(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        v = float(v)
        return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, np.integer):
        return int(v)
    return v


@dataclass
class RunComparison:
    """The result of :func:`compare_runs`.

    Attributes:
        meta_diffs: ``(key, value in A, value in B)`` for every differing ``meta.json`` entry (dotted keys).
        step: the first step where any series parts ways (None: none does).
        first: the series that parts ways first (a scalar such as ``loss`` when it does at that step).
        module: the first module or parameter series to part ways (None: no module statistic does).
        splits: every series that parts ways, in the order described in the module docstring.
        steps: the number of steps both runs recorded.
    """

    path_a: Path
    path_b: Path
    meta_diffs: list[tuple[str, Any, Any]]
    step: int | None
    first: Split | None
    module: Split | None
    splits: list[Split]
    steps: int
    series: int
    curve_name: str | None = None
    curve_a: pd.Series | None = None
    curve_b: pd.Series | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return self.step is None

    def label(self, which: str) -> str:
        return (self.path_a if which == "A" else self.path_b).name

    def summary(self) -> str:
        if self.step is None:
            return (f"the runs do not part ways: {self.series} series over {self.steps} shared steps agree within "
                    "their noise")
        f = self.first
        text = (f"the runs part ways at step {self.step}: first {f.kind} {f.where} {f.stat} "
                f"(A {_fmt(f.a)}, B {_fmt(f.b)})")
        if self.module is not None:
            m = self.module
            at = "" if m.step == self.step else f" (at step {m.step})"
            text += f"; first module/parameter: {m.where} ({m.kind} {m.stat}: A {_fmt(m.a)}, B {_fmt(m.b)}){at}"
        return text

    def as_dict(self) -> dict:
        return {
            "run_a": str(self.path_a), "run_b": str(self.path_b), "same": self.same, "summary": self.summary(),
            "meta_diffs": [{"key": k, "a": a, "b": b} for k, a, b in self.meta_diffs],
            "step": self.step, "first": self.first.as_dict() if self.first else None,
            "module": self.module.as_dict() if self.module else None,
            "splits": [s.as_dict() for s in self.splits[:200]], "splits_total": len(self.splits),
            "steps": self.steps, "series": self.series, "notes": self.notes,
        }

    def plot(self, path: str | Path) -> Path:
        """Write both runs' loss curves, overlaid, with the step where they part ways marked."""
        from stethoscope.compare.figures import loss_curves

        return loss_curves(self, Path(path))


def _fmt(x: float) -> str:
    from stethoscope._format import format_float

    return format_float(float(x), 4)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and any(isinstance(v, dict | list) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: obj}


def meta_differences(meta_a: dict, meta_b: dict) -> list[tuple[str, Any, Any]]:
    """Every dotted ``meta.json`` key whose value differs (times, status and verdict left out: they differ
    between any two runs, or are the outcome rather than the setup)."""
    fa, fb = _flatten(meta_a), _flatten(meta_b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if key.split(".")[0] in _META_SKIP:
            continue
        va, vb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if va != vb:
            out.append((key, va, vb))
    return out


def _long(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, kind, name, output, stat, value), with the row's position in the file as ``pos``."""
    if metrics.empty or "kind" not in metrics:
        return pd.DataFrame(columns=["step", "kind", "name", "output", "stat", "value", "pos"])
    df = metrics[metrics["kind"].isin(list(_KIND_ORDER))].copy()
    df = df[df["step"].notna()]
    df["pos"] = np.arange(len(df))
    df["output"] = df["output"].fillna("") if "output" in df else ""
    df["name"] = df["name"].fillna("")
    stats = [c for c in df.columns if c not in _NOT_STATS and c != "pos"]
    parts = []
    for _, sub in df.groupby("kind", sort=False):  # a kind's own statistics; a NaN among them is a value
        cols = [c for c in stats if sub[c].notna().any()]
        parts.append(sub.melt(id_vars=["step", "kind", "name", "output", "pos"], value_vars=cols, var_name="stat",
                              value_name="v"))
    long = pd.concat(parts, ignore_index=True).rename(columns={"v": "value"})
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    long["step"] = long["step"].astype(int)
    return long


def _noise(a: np.ndarray, b: np.ndarray, t: int) -> float:
    """``1.4826 * median |Δx|`` of both runs' finite first differences before index ``t`` (0 under three)."""
    diffs = np.concatenate([np.diff(a[:t]), np.diff(b[:t])])
    diffs = diffs[np.isfinite(diffs)]
    return 1.4826 * float(np.median(np.abs(diffs))) if diffs.size >= 3 else 0.0


def _first_split(a: np.ndarray, b: np.ndarray, rtol: float, atol: float, sigmas: float) -> tuple[int, float, float]:
    """Index of the first step where the series part ways (-1: never), its threshold and the noise there."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    with np.errstate(invalid="ignore"):
        same_nonfinite = ~fa & ~fb & ((a == b) | (np.isnan(a) & np.isnan(b)))
        d = np.where(fa & fb, np.abs(a - b), np.where(same_nonfinite, 0.0, np.inf))
        base = np.maximum(atol, rtol * np.maximum(np.abs(np.where(fa, a, 0)), np.abs(np.where(fb, b, 0))))
    for t in np.flatnonzero(d > base):
        noise = _noise(a, b, int(t))
        thr = max(float(base[t]), sigmas * noise)
        if d[t] > thr:
            return int(t), thr, noise
    return -1, 0.0, 0.0


def _origin(ordered: list[Split]) -> Split | None:
    """The first module whose activations part ways while its recorded inputs do not (yet): a child whose
    input already differs (``c_proj`` fed a NaN its parent's own forward made) hands the blame to the next
    module to finish, its parent, as the monitor's ``numerics.nonfinite`` does. Without activation rows,
    the first module or parameter series."""
    inputs_apart = {}
    for s in ordered:
        if s.kind == "input":
            inputs_apart.setdefault(s.name, s.step)
    for s in ordered:
        if s.kind == "act" and not (s.name in inputs_apart and inputs_apart[s.name] <= s.step):
            return s
    return next((s for s in ordered if s.kind != "scalar"), None)


def compare_runs(run_a: str | Path, run_b: str | Path, *, rtol: float = RTOL, atol: float = ATOL,
                 sigmas: float = SIGMAS) -> RunComparison:
    """Compare two run directories: ``meta.json`` differences, loss curves, and the first step and module
    where the recorded statistics part ways beyond their noise (criterion in the module docstring).

    Raises:
        RunDirError: a folder is not a run directory.
        CompareError: the runs share no recorded step.
    """
    from stethoscope.run import RunDirWarning, load_run

    if sigmas < 0 or rtol < 0 or atol < 0:
        raise CompareError(f"rtol, atol and sigmas must be >= 0 (got {rtol}, {atol}, {sigmas})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunDirWarning)
        ra, rb = load_run(run_a), load_run(run_b)
    notes = [f"run {w}: {p}" for w, r in (("A", ra), ("B", rb)) for p in r.problems]
    la, lb = _long(ra.metrics), _long(rb.metrics)
    keys = ["step", "kind", "name", "output", "stat"]
    # a module called in several rows of one step (should not happen: rows are aggregated) keeps its first
    la, lb = la.drop_duplicates(keys), lb.drop_duplicates(keys)
    both = la.merge(lb[[*keys, "value"]], on=keys, suffixes=("_a", "_b"), how="inner")
    steps = sorted(set(la["step"]) & set(lb["step"]))
    if not steps:
        raise CompareError(f"runs {str(ra.path)!r} and {str(rb.path)!r} share no recorded step with the same "
                           "statistics; compare runs of the same training script (metrics.jsonl of each)")
    splits: list[tuple[tuple, Split]] = []
    n_series = 0
    for (kind, name, output, stat), g in both.groupby(["kind", "name", "output", "stat"], sort=False):
        g = g.sort_values("step")
        n_series += 1
        a, b = g["value_a"].to_numpy(float), g["value_b"].to_numpy(float)
        t, thr, noise = _first_split(a, b, rtol, atol, sigmas)
        if t < 0:
            continue
        row = g.iloc[t]
        s = Split(kind, name, stat, output, int(row["step"]), float(a[t]), float(b[t]), thr, noise)
        splits.append(((s.step, _KIND_ORDER[kind], int(row["pos"])), s))
    splits.sort(key=lambda x: x[0])
    ordered = [s for _, s in splits]
    step = ordered[0].step if ordered else None
    # at the first step, a scalar (the loss) is the headline when it parts ways there; else the first series
    first = next((s for s in ordered if s.step == step and s.kind == "scalar"), ordered[0] if ordered else None)
    module = _origin(ordered)
    if module is not None and step is not None and module.step != step:
        notes.append(f"no module statistic was recorded apart at step {step}; the first module to part ways did at "
                     f"step {module.step} (module statistics exist only on sampled steps)")
    sa, sb = ra.scalars(), rb.scalars()
    curve = next((c for c in ("loss", "train_loss", "eval_loss") if c in sa and c in sb),
                 next((c for c in sa.columns if c in sb.columns), None) if not sa.empty and not sb.empty else None)
    return RunComparison(
        path_a=ra.path, path_b=rb.path, meta_diffs=meta_differences(ra.meta, rb.meta), step=step, first=first,
        module=module, splits=ordered, steps=len(steps), series=n_series, curve_name=curve,
        curve_a=sa[curve].dropna() if curve else None, curve_b=sb[curve].dropna() if curve else None, notes=notes,
    )
