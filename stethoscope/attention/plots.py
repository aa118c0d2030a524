"""Heatmaps of step-by-step attention weights: one PNG per layer and head (matplotlib, Agg backend)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _short(tok: str, width: int = 10) -> str:
    tok = tok.replace("\n", "\\n")
    return tok if len(tok) <= width else tok[: width - 1] + "…"


def draw_heatmaps(result: Any, folder: str | Path) -> list[Path]:
    """Draw every head of a :class:`~stethoscope.attention.stepwise.StepByStep` into ``folder``.

    Files are named ``<layer>.head<h>.png`` (the module name with unsafe characters replaced). One figure is
    reused for all heads, so a 6 x 12-head model takes a few seconds, not a minute.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if not result.heads:
        return paths
    n = max(len(result.heads[0].weights), 1)
    size = min(8.0, 2.2 + 0.42 * n)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    try:
        image = None
        for h in result.heads:
            w = np.asarray(h.weights, dtype=float)
            tq, tk = w.shape
            cols = [_short(t) for t in result.tokens[-tk:]]
            rows = [_short(t) for t in result.tokens[-tq:]]
            ax.clear()
            image = ax.imshow(w, vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal")
            ax.set_xticks(range(tk), cols, rotation=60, ha="right", fontsize=8)
            ax.set_yticks(range(tq), rows, fontsize=8)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            ax.set_title(f"{h.layer} · head {h.head}", fontsize=9)
            if tq * tk <= 144:
                for i in range(tq):
                    for j in range(tk):
                        ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if w[i, j] < 0.6 else "black")
            if len(fig.axes) == 1:
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="probability")
            fig.tight_layout()
            path = folder / f"{_SAFE.sub('_', h.layer or 'model')}.head{h.head}.png"
            fig.savefig(path, dpi=80)
            paths.append(path)
    finally:
        plt.close(fig)
    return paths
