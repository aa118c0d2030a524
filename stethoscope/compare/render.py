"""Printing a comparison on the console: the verdict line first, then a rich table."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from stethoscope._format import format_float, format_value
from stethoscope.compare.result import Comparison
from stethoscope.compare.runs import RunComparison

MAX_META = 30  # meta.json differences printed (all of them are in --json)
MAX_SPLITS = 12  # series printed that part ways


def _e(x: float | None) -> str:
    return "—" if x is None else format_float(float(x), 3)


def print_models(result: Comparison, console: Any, title: str = "") -> None:
    """Verdict, notes, then the error-growth table (blocks, the first divergence and the origin)."""
    from stethoscope.hf_loading import fitted_table

    if title:
        console.print(escape(title), soft_wrap=True, style="bold")
    style = "green" if result.same else "bold red"
    console.print(f"[{style}]{escape(result.summary())}[/]", soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {escape(note)}", soft_wrap=True)
    first, origin = result.first, result.origin
    cells = []
    for r in result.layers():
        mark = "first" if r is first else ""
        if r is origin:
            mark = "first+origin" if mark else "origin"
        elif r.differs and not mark:
            mark = "differs"
        cells.append([r.label, r.cls, _e(r.rel), f"{r.severity():.2g}", _e(r.max_abs), f"{100 * r.share:.1f} %",
                      _e(r.input_rel), mark])
    console.print(fitted_table(
        f"error growth, execution order (match: {result.match}; rel = ||b-a|| / ||a||; x tol = rel / "
        f"({result.factor:g} x eps of the lower dtype); every module in .table() and --json)",
        ["module", "class", "rel", "x tol", "max abs", "differ", "input rel", ""], cells, console.width,
        right=(2, 3, 4, 5, 6)))
    if result.grads:
        bad = [g for g in result.grads if g.differs]
        console.print(f"gradients: {len(bad)} of {len(result.grads)} parameters differ"
                      + (f"; largest rel {_e(max(g.rel for g in bad))}" if bad else ""), soft_wrap=True)
    if result.unmatched_a or result.unmatched_b:
        console.print(f"unmatched module calls: {len(result.unmatched_a)} in A, {len(result.unmatched_b)} in B "
                      "(see --json)", soft_wrap=True)


def print_runs(result: RunComparison, console: Any) -> None:
    """meta.json differences first, then where the runs part ways and the first series that did."""
    from stethoscope.hf_loading import fitted_table

    a, b = result.label("A"), result.label("B")
    if result.meta_diffs:
        cells = [[k, format_value(va), format_value(vb)] for k, va, vb in result.meta_diffs[:MAX_META]]
        more = len(result.meta_diffs) - len(cells)
        console.print(fitted_table(f"meta.json differences (A = {a}, B = {b})" + (f", {more} more in --json"
                                                                              if more > 0 else ""),
                                   ["key", "A", "B"], cells, console.width))
    else:
        console.print("meta.json: same config, versions and model summary", soft_wrap=True)
    style = "green" if result.same else "bold red"
    console.print(f"[{style}]{escape(result.summary())}[/]", soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {escape(note)}", soft_wrap=True)
    if result.splits:
        seen: set[tuple[str, str]] = set()
        cells = []
        for s in result.splits:  # one row per module and kind: the first statistic of it to part ways
            if (s.kind, s.name) in seen:
                continue
            seen.add((s.kind, s.name))
            cells.append([s.where, s.kind, s.stat, str(s.step), format_value(s.a), format_value(s.b),
                          _e(s.threshold)])
            if len(cells) == MAX_SPLITS:
                break
        console.print(fitted_table(f"first series to part ways ({len(result.splits)} of {result.series} series; "
                                   f"{result.steps} shared steps; one row per module and kind)",
                                   ["name", "kind", "stat", "step", "A", "B", "threshold"], cells, console.width,
                                   right=(3, 4, 5, 6)))
