"""What ``st.compare`` returns: one row per module call, the first divergence, its origin, a table and a plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stethoscope._format import format_float
from stethoscope.compare.layers import is_layer


@dataclass
class ModuleDiff:
    """One module call of model B against the matching call of model A (the worst tensor leaf of its output)."""

    order: int  # position in B's execution order (when the call finished)
    name: str  # model A's name for the module
    name_b: str  # model B's name
    cls: str
    call: int  # 0 for the first call of the module in the forward
    shape: str  # the first output leaf's shape
    dtype_a: str
    dtype_b: str
    leaf: str  # path of the worst output leaf ("" for a bare tensor)
    leaves: int  # tensor leaves compared
    rel: float  # ||b - a|| / max(||a||, ||b||) of the worst leaf
    max_abs: float
    max_rel: float  # max |b - a| / max |a|
    share: float  # share of differing elements
    tol: float  # the tolerance rel was held against (factor * eps of the lower dtype)
    differs: bool
    input_rel: float | None  # worst input leaf's rel (None: no tensor input was matched)
    inputs_differ: bool

    def severity(self) -> float:
        """``rel / tol``: how many tolerances away (inf for a mismatch an exact comparison caught)."""
        if self.tol > 0:
            return self.rel / self.tol
        return math.inf if self.rel else 0.0

    @property
    def label(self) -> str:
        shown = self.name or "<model>"
        return shown if self.call == 0 else f"{shown} (call {self.call})"


@dataclass
class GradDiff:
    """One parameter's gradient after the same loss's backward in both models."""

    name: str
    shape: str
    rel: float
    max_abs: float
    max_rel: float
    share: float
    tol: float
    differs: bool


@dataclass
class Comparison:
    """The result of :func:`stethoscope.compare`.

    Attributes:
        rows: every compared module call, in model B's execution order.
        grads: every compared parameter gradient (with ``backward=True``).
        match: how modules were paired: ``name``, ``order`` or ``output`` (a compiled model: outputs only).
        factor: the tolerance factor (``rel > factor * eps`` of the lower dtype differs).
        notes: what the reader should know (compiled model, training mode, spilled memory).
        unmatched_a, unmatched_b: module calls of one model with no partner in the other.
    """

    rows: list[ModuleDiff]
    grads: list[GradDiff] = field(default_factory=list)
    match: str = "name"
    factor: float = 8.0
    notes: list[str] = field(default_factory=list)
    unmatched_a: list[str] = field(default_factory=list)
    unmatched_b: list[str] = field(default_factory=list)
    batches: int = 1
    peak_bytes: int = 0

    @property
    def first(self) -> ModuleDiff | None:
        """The first module (in execution order) whose output differs beyond the tolerance."""
        return next((r for r in self.rows if r.differs), None)

    @property
    def origin(self) -> ModuleDiff | None:
        """The first module whose output differs while its inputs agree: where the difference is born."""
        return next((r for r in self.rows if r.differs and not r.inputs_differ), None)

    @property
    def same(self) -> bool:
        """No module output and no gradient differs beyond the tolerance."""
        return self.first is None and not any(g.differs for g in self.grads)

    @property
    def identical(self) -> bool:
        """Every compared tensor is bit-for-bit equal."""
        return all(r.max_abs == 0 and r.rel == 0 for r in self.rows) and all(g.max_abs == 0 for g in self.grads)

    @property
    def worst(self) -> ModuleDiff:
        return max(self.rows, key=lambda r: (r.severity(), r.rel))

    def layers(self) -> list[ModuleDiff]:
        """The error-growth rows: the model, its direct children and each repeated block, plus the first
        divergence and the origin, in execution order."""
        keep = {id(r) for r in (self.first, self.origin) if r is not None}
        return [r for r in self.rows if is_layer(r.name) or id(r) in keep]

    def summary(self) -> str:
        """One sentence: where the models part ways, or that they do not."""
        n = len(self.rows)
        if self.first is None:
            grads = [g for g in self.grads if g.differs]
            if grads:
                return (f"no module output differs ({n} compared), but {len(grads)} gradient(s) do: first "
                        f"{grads[0].name} (rel {format_float(grads[0].rel, 3)})")
            kind = "bit-identical" if self.identical else "within tolerance"
            w = self.worst
            return (f"no difference: {n} module outputs compared, all {kind} (largest rel error "
                    f"{format_float(w.rel, 3)} at {w.label}, tolerance {format_float(w.tol, 3)})")
        f, o = self.first, self.origin
        text = (f"first divergence: {f.label} ({f.cls}) rel error {format_float(f.rel, 3)} > tolerance "
                f"{format_float(f.tol, 3)}, max abs {format_float(f.max_abs, 3)}, {100 * f.share:.1f} % of elements")
        if o is f:
            text += "; its inputs agree: this is where the difference is born"
        elif o is not None:
            text += f"; its inputs already differed; origin: {o.label} ({o.cls}), rel {format_float(o.rel, 3)}"
        else:
            text += "; its inputs already differed (the difference enters through the model's inputs)"
        return text

    def table(self) -> Any:
        """Every row as a pandas DataFrame (one row per module call, execution order)."""
        import pandas as pd

        frame = pd.DataFrame([asdict(r) for r in self.rows])
        if not frame.empty:
            frame["tolerances"] = [r.severity() for r in self.rows]
        return frame

    def grad_table(self) -> Any:
        import pandas as pd

        return pd.DataFrame([asdict(g) for g in self.grads])

    def as_dict(self) -> dict:
        """JSON-ready: summary, first, origin, every row, gradients, notes."""
        def clean(d: dict) -> dict:
            return {k: (None if isinstance(v, float) and not math.isfinite(v) and math.isnan(v) else
                        ("inf" if isinstance(v, float) and math.isinf(v) else v)) for k, v in d.items()}

        return {
            "same": self.same, "identical": self.identical, "summary": self.summary(), "match": self.match,
            "factor": self.factor, "batches": self.batches,
            "first": clean(asdict(self.first)) if self.first else None,
            "origin": clean(asdict(self.origin)) if self.origin else None,
            "modules": [clean(asdict(r)) for r in self.rows], "gradients": [clean(asdict(g)) for g in self.grads],
            "notes": self.notes, "unmatched_a": self.unmatched_a, "unmatched_b": self.unmatched_b,
        }

    def plot(self, path: str | Path) -> Path:
        """Write the error-growth figure (relative error of every module output in execution order, log
        scale, the tolerance as a line, the first divergence marked) to ``path`` (PNG/SVG/PDF)."""
        from stethoscope.compare.figures import error_growth

        return error_growth(self, Path(path))

    def __repr__(self) -> str:
        return f"Comparison({self.summary()})"
