"""The report's preflight section: the ``preflight.*`` findings recorded with the run, as a checklist."""

from __future__ import annotations

from stethoscope.report.model import Section, Table
from stethoscope.report.registry import register_section
from stethoscope.run import Run


@register_section("preflight", order=20)
def preflight_section(run: Run) -> Section | None:
    """A Section listing the preflight findings (``step: null``), or None when the run has none."""
    found = [f for f in run.findings if f.code.startswith("preflight.")]
    if not found:
        return None
    rows = [[f.severity, f.code, f.target or "—", f.message, f.hint] for f in found]
    return Section(
        "preflight",
        "Preflight checks",
        "Problems in the setup found before training (st.preflight / stethoscope check): optimizer groups, "
        "special tokens, learning rate, clipping and initialisation. Each one says how to fix it.",
        tables=[Table(["severity", "code", "target", "what", "fix"], rows, code_columns=(1, 2))],
    )
