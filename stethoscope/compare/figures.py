"""The two figures of ``stethoscope compare``: a model comparison's error growth, two runs' loss curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stethoscope.compare.layers import is_layer
from stethoscope.errors import MissingDependencyError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency of the report
        raise MissingDependencyError("matplotlib", "report", "drawing the comparison figure") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def error_growth(result: Any, path: Path) -> Path:
    """A :class:`~stethoscope.compare.result.Comparison`'s relative error per module output in execution order
    (log y), tolerance line, block ticks, first divergence marked. Exact zeros sit on the bottom edge."""
    plt = _pyplot()
    rows = result.rows
    positive = [r.rel for r in rows if 0 < r.rel < math.inf]
    floor = min(positive + [r.tol for r in rows if r.tol > 0] + [1e-12]) / 10
    top = max(positive + [r.tol for r in rows] + [floor * 100]) * 10
    ys = [min(max(r.rel, floor), top) for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.plot(range(len(rows)), ys, lw=0.8, color="0.6", zorder=1)
    colors = ["tab:red" if r.differs else "tab:blue" for r in rows]
    ax.scatter(range(len(rows)), ys, s=10, c=colors, zorder=2)
    ax.step(range(len(rows)), [r.tol if r.tol > 0 else floor for r in rows], where="mid", color="tab:orange",
            lw=1, label="tolerance (factor x eps of the lower dtype)")
    blocks = [(i, r.label) for i, r in enumerate(rows) if is_layer(r.name) and r.name]
    step = max(1, len(blocks) // 24)
    ax.set_xticks([i for i, _ in blocks[::step]], [lbl for _, lbl in blocks[::step]], rotation=60, ha="right",
                  fontsize=7)
    first = result.first
    if first is not None:
        ax.axvline(first.order, color="tab:red", ls="--", lw=1, label=f"first divergence: {first.label}")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, top)
    ax.set_ylabel("relative error ||b - a|| / ||a||")
    ax.set_xlabel("module outputs in execution order")
    ax.set_title(result.summary()[:110], fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(result: Any, path: Path) -> Path:
    """A :class:`~stethoscope.compare.runs.RunComparison`: both runs' loss (or the first shared scalar) against step, the step where they part ways marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    name = result.curve_name
    for label, series in (("A", result.curve_a), ("B", result.curve_b)):
        if series is not None and len(series):
            ax.plot(series.index, series.values, lw=1.2, label=f"{label}: {result.label(label)}")
    if result.step is not None:
        ax.axvline(result.step, color="tab:red", ls="--", lw=1, label=f"part ways at step {result.step}")
    ax.set_xlabel("step")
    ax.set_ylabel(name or "value")
    ax.set_title(f"{name or 'no shared scalar'}: run A vs run B", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
