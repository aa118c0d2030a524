"""The run report: ``report.html`` (one self-contained page) and ``report.md`` (its Markdown twin).

``write_report(run_dir)`` writes both, from one model of the report's content (:mod:`.model`, built by
:mod:`.content`) that the console summary shares (:mod:`.summary`): the verdict, the run's facts, the findings
most severe first with their hints, and a section per kind of data the run recorded — training curves,
gradients, activations, update ratios, attention, memory, timing, hang and crash dumps, preflight checks —
each only when its data exists. Each section is a small module registered with
:func:`~stethoscope.report.registry.register_section` (:mod:`.registry`).

Example:
    >>> from stethoscope.report import write_report
    >>> write_report("runs/exp1")  # doctest: +SKIP
    PosixPath('runs/exp1/report.md')
"""

from __future__ import annotations

from pathlib import Path

from stethoscope.report.content import VERDICT_WORDS, build
from stethoscope.report.html import render_html
from stethoscope.report.markdown import FILES_DIR, image_name, render_markdown_content
from stethoscope.report.model import ReportContent, layer_group
from stethoscope.report.plots import Image, render_all
from stethoscope.report.summary import findings_table, print_summary
from stethoscope.run import Run, load_run

__all__ = [
    "VERDICT_WORDS",
    "ReportContent",
    "build",
    "findings_table",
    "layer_group",
    "print_summary",
    "render_html",
    "render_markdown",
    "write_report",
]


def render_markdown(run: Run) -> str:
    """``report.md``'s text for ``run`` without figures (tables only); :func:`write_report` adds them."""
    return render_markdown_content(build(run))


def write_report(run_dir: str | Path | Run, plots: bool = True) -> Path:
    """Write ``report.html`` and ``report.md`` (figures in ``report_files/``) into the run directory.

    Args:
        run_dir: the run directory (or the :class:`~stethoscope.run.Run` already read from it).
        plots: draw the figures (about 0.1–0.3 s each with matplotlib); False writes the same pages with
            the tables only.

    Returns the path of ``report.md``; ``report.html`` sits beside it.
    """
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    run_dir = run.path
    content = build(run)
    if not plots:
        for section in content.sections:
            section.plots = [p for p in section.plots if p.kind == "image"]  # files already drawn: free
    images = render_all(content.plots())
    path = Path(run_dir)
    files = path / FILES_DIR
    written = set()
    for plot in content.plots():
        image = images.get(plot.id)
        if isinstance(image, Image):
            files.mkdir(exist_ok=True)
            target = path / image_name(plot, image)
            target.write_bytes(image.data)
            written.add(target.name)
    if files.is_dir():  # figures of an earlier report that this one no longer has
        for old in files.iterdir():
            if old.is_file() and old.name not in written:
                old.unlink(missing_ok=True)
    (path / "report.html").write_text(render_html(content, images), encoding="utf-8")
    md = path / "report.md"
    md.write_text(render_markdown_content(content, images), encoding="utf-8")
    return md
