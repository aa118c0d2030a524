"""What the report says, computed once from a :class:`~stethoscope.run.Run`.

One model of the report (:mod:`.model`) — verdict, run facts, findings, and the sections that have data —
shared by the HTML page, the Markdown twin and the console summary, so the three never disagree. The
sections come from the registry (:mod:`.registry`): each is a small module of its own, beside its feature
(``stethoscope/memory/report.py``, ``stethoscope/attention/report.py``, ``stethoscope/checks/report.py``) or
in :mod:`stethoscope.report.sections`. Computing is kept apart from drawing (``plots.py``) and from writing
(``html.py``, ``markdown.py``).
"""

from __future__ import annotations

from datetime import datetime

from stethoscope.report.model import (
    MAX_COLS,
    MAX_LINES,
    MAX_POINTS,
    MAX_ROWS,
    TOP_N,
    FindingRow,
    Link,
    Plot,
    ReportContent,
    Section,
    Table,
    fmt,
    layer_group,
    pct,
    thin,
)
from stethoscope.report.registry import section_builders
from stethoscope.run import Finding, Run
from stethoscope.units import with_unit

__all__ = [
    "MAX_COLS",
    "MAX_LINES",
    "MAX_POINTS",
    "MAX_ROWS",
    "TOP_N",
    "VERDICT_WORDS",
    "FindingRow",
    "Link",
    "Plot",
    "ReportContent",
    "Section",
    "Table",
    "build",
    "finding_rows",
    "fmt",
    "layer_group",
    "pct",
    "thin",
    "verdict_of",
    "when",
]

VERDICT_WORDS = {
    "healthy": "healthy — no warning or critical finding",
    "warning": "warning — something needs a look",
    "critical": "critical — training is likely broken",
}


def when(f: Finding) -> str:
    start = "preflight" if f.first_step is None else f"step {f.first_step}"
    if f.cleared_step is not None:
        return f"{start} → cleared at step {f.cleared_step}"
    return f"{start} → still open"


def finding_rows(run: Run) -> list[FindingRow]:
    """The findings as the report, ``stethoscope findings`` and the summary show them: incident by incident,
    worst first, each root followed by its consequences."""
    rows = []
    for number, incident in enumerate(run.incidents, start=1):
        saved = run.capture_of(incident.root) or {}
        for f in incident.findings:
            link = f.data.get("caused_by") if isinstance(f.data.get("caused_by"), dict) else {}
            members = len(f.members)
            root = f is incident.root
            rows.append(
                FindingRow(
                    severity=f.severity,
                    code=f.code,
                    target=_target(f.target) + (f" ({members})" if members else "")
                    + (f" (rank {f.rank})" if f.rank is not None else ""),
                    value=with_unit(f.code, f.worst_value, f.target, f.data, f.value),  # units: stethoscope/units.py
                    threshold=with_unit(f.code, f.threshold, f.target, f.data, f.value),
                    started="preflight" if f.first_step is None else str(f.first_step),
                    cleared="still open" if f.cleared_step is None else str(f.cleared_step),
                    when=when(f),
                    message=f.message or "",
                    hint=f.hint or "",
                    incident=number,
                    consequence=f is not incident.root,
                    reason=link.get("reason", "") if f is not incident.root else "",
                    members=members,
                    replay=saved.get("folder", "") if root else "",
                    replay_weights=_weights_words(saved) if root else "",
                    replay_factory=root and bool((saved.get("factory") or {}).get("spec")),
                )
            )
    return rows


_WEIGHTS_WORDS = {
    "before_optimizer_step": "the weights the failing forward used",
    "unchanged_by_step": "the weights the failing forward used (its update was skipped)",
    "after_step": "the weights at the step's end",
    "after_optimizer_step": "the weights one update later",
}


def _weights_words(manifest: dict) -> str:
    weights = manifest.get("weights") if isinstance(manifest.get("weights"), dict) else {}
    return _WEIGHTS_WORDS.get(weights.get("when"), "") if weights.get("file") else ""


def _target(target: str | None) -> str:
    """``<model>`` for the root module (``""``), ``—`` for a finding about no module."""
    return "—" if target is None else (target or "<model>")


def cause_of(run: Run) -> str:
    """The root of the worst incident in words: "`numerics.nonfinite` on `h.2.attn` (step 12), 8 findings
    follow from it" ("" for a healthy run)."""
    cause = run.verdict.get("cause")
    if not cause:
        return ""
    text = f"`{cause['code']}` on `{cause['target'] or '<model>'}`"
    if cause.get("step") is not None:
        text += f" (step {cause['step']})"
    n = cause.get("consequences", 0)
    if n:
        text += f", {n} finding{'s' if n != 1 else ''} follow{'s' if n == 1 else ''} from it"
    return text


def verdict_of(run: Run) -> tuple[str, str, dict]:
    v = run.verdict
    return v["status"], VERDICT_WORDS.get(v["status"], v["status"]), v["counts"]


def build(run: Run, findings_only: bool = False) -> ReportContent:
    """The report's content for ``run``; ``findings_only`` skips the sections (for the console)."""
    status, words, counts = verdict_of(run)
    content = ReportContent(
        title=f"stethoscope report — {run.path.name}",
        verdict=status,
        verdict_words=words,
        counts=counts,
        facts=[] if findings_only else _facts(run),
        findings=finding_rows(run),
        sections=[],
        cause=cause_of(run),
        incidents=run.verdict.get("incidents", 0),
    )
    if findings_only:
        return content
    for builder in section_builders():
        try:
            section = builder.build(run)
        except Exception as exc:  # one section's bad data must not cost the whole report
            section = Section(
                id=builder.name,
                title=builder.name.replace("_", " "),
                notes=[f"this section could not be computed: {type(exc).__name__}: {exc}"],
            )
        if section is not None:
            content.sections.append(section)
    return content


# ------------------------------------------------------------------------------------------------- facts


def _duration(meta: dict) -> str | None:
    try:
        start = datetime.fromisoformat(meta["started_at"])
        end = datetime.fromisoformat(meta["ended_at"])
    except (KeyError, TypeError, ValueError):
        return None
    seconds = (end - start).total_seconds()
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _sampled_steps(run: Run) -> list:
    df = run.metrics
    if df.empty or "kind" not in df:
        return []
    rows = df[df["kind"].isin(["act", "grad", "update", "input"])]
    return sorted(rows["step"].dropna().unique().tolist())


def _facts(run: Run) -> list[tuple[str, str]]:
    meta = run.meta
    model = meta.get("model") or {}
    versions = meta.get("versions") or {}
    facts = [("status", str(meta.get("status", "unknown")))]
    if model:
        facts.append(
            (
                "model",
                f"{model.get('class', '?')} — {model.get('parameters', 0):,} parameters "
                f"({model.get('trainable_parameters', 0):,} trainable), "
                f"{model.get('modules', '?')} modules"
                + (f", {', '.join(model['dtypes'])}" if model.get("dtypes") else "")
                + (f" on {', '.join(model['devices'])}" if model.get("devices") else ""),
            )
        )
    opt = meta.get("optimizer") or {}
    if opt:
        groups = opt.get("groups") or []
        lrs = sorted({g.get("lr") for g in groups if isinstance(g.get("lr"), int | float)})
        facts.append(
            (
                "optimizer",
                f"{opt.get('class', '?')}, {len(groups)} group(s)"
                + (f", lr {', '.join(fmt(x) for x in lrs)}" if lrs else ""),
            )
        )
    sampled = _sampled_steps(run)
    steps = meta.get("last_step")
    if steps is not None:
        facts.append(
            ("steps", f"last step {steps}" + (f"; {len(sampled)} sampled step(s)" if sampled else ""))
        )
    dur = _duration(meta)
    facts.append(("duration", (dur + ", " if dur else "") + f"started {meta.get('started_at', '?')}"))
    if meta.get("world_size") and meta.get("world_size") != 1:
        facts.append(("ranks", str(meta.get("world_size"))))
    if versions:
        facts.append(
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "platform"))
        )
    if meta.get("schedule"):
        facts.append(("sampling", str(meta["schedule"])))
    if meta.get("error"):
        facts.append(("error", str(meta["error"])))
    return facts

