"""The report's hang and crash dumps section: each ``hang-*.txt`` / ``crash-*.txt`` linked, its first lines shown."""

from __future__ import annotations

from stethoscope.report.model import DUMP_LINES, TOP_N, Link, Section
from stethoscope.report.registry import register_section
from stethoscope.run import Run


@register_section("dumps", order=10)
def dumps(run: Run) -> Section | None:
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
