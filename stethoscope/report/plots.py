"""Drawing the report's plots: :class:`~stethoscope.report.model.Plot` data in, PNG bytes out.

matplotlib with the Agg backend, through ``matplotlib.figure.Figure`` (no pyplot, no global state, no
display needed). Figures are small and at a modest resolution so that a page with a dozen of them stays well
under a few megabytes and renders in a fraction of a second each.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stethoscope.report.model import Plot

DPI = 96
WIDTH = 10.0  # inches; the HTML page shows figures at up to 100 % of an ~ 1000 px column


@dataclass
class Image:
    """A rendered figure: its bytes and MIME type (``image/png``, or the type of an embedded file)."""

    data: bytes
    mime: str = "image/png"
    ext: str = "png"


def render(plot: Plot) -> Image:
    """Draw one plot (or copy the picture file of an ``image`` plot)."""
    if plot.kind == "image":
        path = Path(plot.data["path"])
        ext = path.suffix.lower().lstrip(".")
        mime = {"svg": "image/svg+xml", "jpg": "image/jpeg", "jpeg": "image/jpeg"}.get(ext, f"image/{ext}")
        return Image(path.read_bytes(), mime, ext)
    from matplotlib.figure import Figure

    panels = plot.panels or [plot]
    n = len(panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    height = max(_height(p) for p in panels) * nrows
    # margins computed from the labels up front (a layout engine measures every text twice: slow)
    fig = Figure(figsize=(WIDTH, height), dpi=DPI)
    axes = np.atleast_1d(
        fig.subplots(
            nrows, ncols, squeeze=False, gridspec_kw=_margins(panels, ncols, nrows, height, bool(plot.panels))
        )
    ).ravel()
    for ax, p in zip(axes, panels, strict=False):
        _DRAW[p.kind](fig, ax, p)
        if plot.panels:
            ax.set_title(p.title, fontsize=9)
    for ax in axes[n:]:
        ax.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return Image(buf.getvalue())


_CHAR = 0.056  # inches per character of a 7-point tick label (DejaVu Sans, average)


def _left(p: Plot) -> float:
    """Inches needed left of the axes: the y tick labels (and y label)."""
    if p.kind in ("heatmap", "bars"):
        labels = p.data.get("rows" if p.kind == "heatmap" else "labels", [])
        width = max((len(_short(str(x), 30 if p.kind == "heatmap" else 40)) for x in labels), default=4)
        return 0.2 + _CHAR * width
    return 0.75


def _right(p: Plot) -> float:
    """Inches needed right of the axes: a legend outside, or the labels of a colour bar."""
    if p.kind == "heatmap":
        return 0.2 + (0.25 if p.data.get("cbar") else 0.0)
    if p.kind == "lines":
        series = p.data.get("series", [])
        if p.data.get("colorbar") and len(series) > 1:
            return 0.45 + _CHAR * max(len(_short(s[0], 24)) for s in series)
        if len(series) > 1:
            width = max(len(_short(s[0])) for s in series) * 0.052 + 0.45
            return width * (2 if len(series) > 8 else 1)
    return 0.15


def _margins(panels: list[Plot], ncols: int, nrows: int, height: float, titled: bool) -> dict:
    lefts = [_left(p) for p in panels]
    rights = [_right(p) for p in panels]
    gap = max((rights[i] + lefts[i + 1] for i in range(len(panels) - 1)), default=0.0)
    left, right = max(lefts[::ncols]), max(rights[ncols - 1 :: ncols] or rights)
    axis_w = max(0.8, (WIDTH - left - right - (ncols - 1) * gap) / ncols)
    top, bottom = (0.3 if titled else 0.12), 0.45
    axis_h = max(0.6, (height - nrows * (top + bottom)) / nrows)
    return {
        "left": left / WIDTH,
        "right": 1 - right / WIDTH,
        "wspace": gap / axis_w,
        "top": 1 - top / height,
        "bottom": bottom / height,
        "hspace": (top + bottom) / axis_h,
    }


def _height(p: Plot) -> float:
    if p.kind == "heatmap":
        return min(9.0, max(2.6, 0.9 + 0.17 * len(p.data.get("rows", []))))
    if p.kind == "bars":
        return min(8.0, max(2.4, 0.6 + 0.25 * len(p.data.get("labels", []))))
    return 3.0


def _short(label: str, width: int = 38) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def _lines(fig, ax, p: Plot) -> None:
    d = p.data
    series = d.get("series", [])
    depth = d.get("colorbar") and len(series) > 1
    if depth:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        cmap = colormaps["viridis"]
        norm = Normalize(0, len(series) - 1)
    for i, (label, xs, ys) in enumerate(series):
        ys = np.asarray(ys, dtype=float)
        if d.get("logy"):
            ys = np.where(ys > 0, ys, np.nan)  # log scale: zeros and negatives are gaps, not errors
        color = cmap(norm(i)) if depth else None
        ax.plot(xs, ys, label=_short(label), lw=1.3, color=color, marker="." if len(xs) < 30 else None, ms=3)
    if d.get("logy"):
        ax.set_yscale("log")
    for y, label in d.get("hlines", []):
        ax.axhline(y, color="0.4", ls=":", lw=1)
        ax.annotate(
            label,
            (0.0, y),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color="0.35",
            xytext=(2, 2),
            textcoords="offset points",
        )
    for x, _label in d.get("vlines", []):
        ax.axvline(x, color="0.6", ls="--", lw=0.8)
    ax.set_xlabel(d.get("xlabel", ""), fontsize=8)
    ax.set_ylabel(d.get("ylabel", ""), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.25)
    if depth:
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
        ticks = sorted({0, len(series) - 1, (len(series) - 1) // 2})
        cb.set_ticks(ticks)
        cb.set_ticklabels([_short(series[t][0], 24) for t in ticks], fontsize=7)
        cb.set_label("layer (input → output)", fontsize=8)
    elif len(series) > 1:
        ax.legend(
            fontsize=6.5,
            ncols=1 if len(series) <= 8 else 2,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
        )


def _heatmap(fig, ax, p: Plot) -> None:
    d = p.data
    matrix = np.asarray(d["matrix"], dtype=float)
    rows, cols = list(d.get("rows", [])), list(d.get("cols", []))
    if matrix.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    finite = matrix[np.isfinite(matrix)]
    vmin = d.get("vmin")
    vmax = d.get("vmax")
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1e-12
    from matplotlib import colormaps

    cmap = colormaps[d.get("cmap", "viridis")].with_extremes(bad="0.9")  # no data: light grey
    im = ax.imshow(
        np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax
    )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(str(r), 30) for r in rows], fontsize=max(4.5, 7.5 - 0.05 * len(rows)))
    step = max(1, math.ceil(len(cols) / 12))
    ax.set_xticks(range(0, len(cols), step))
    ax.set_xticklabels([str(c) for c in cols[::step]], fontsize=7)
    ax.set_xlabel(d.get("xlabel", ""), fontsize=8)
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.05)
    cb.ax.tick_params(labelsize=7)
    if d.get("cbar"):
        cb.set_label(d["cbar"], fontsize=8)


def _bars(fig, ax, p: Plot) -> None:
    d = p.data
    labels = [_short(str(x), 40) for x in d.get("labels", [])]
    values = np.asarray(d.get("values", []), dtype=float)
    ax.barh(range(len(values)), values, color="#4c72b0")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel(d.get("xlabel", ""), fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="x", alpha=0.25)


_DRAW = {"lines": _lines, "heatmap": _heatmap, "bars": _bars}


def render_all(plots: list[Plot]) -> dict[str, Image | Exception]:
    """Render every plot; a plot that fails is an exception in the result, shown as a note, not raised."""
    out: dict[str, Image | Exception] = {}
    for plot in plots:
        try:
            with warnings.catch_warnings():  # e.g. a flat series' "identical low and high ylims"
                warnings.simplefilter("ignore", UserWarning)
                out[plot.id] = render(plot)
        except Exception as exc:  # one bad figure must not cost the whole report
            out[plot.id] = exc
    return out
