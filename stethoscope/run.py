"""Reading a run directory back: ``st.load_run(path)``.

Findings are folded from their open/update/close events into one row per ``id`` (first step, worst value,
cleared step); metrics come as pandas DataFrames. A torn last line (the writer was killed) is skipped without
a word; anything else that cannot be read — a damaged line in the middle of a file, an unreadable
``meta.json``, a file cut off although the run finished — is skipped too, but said: one sentence per file in
``run.problems``, each also issued as a :class:`RunDirWarning`.
A distributed run (``rank0/``, ``rank1/``, ... under the folder) is read as one run with a ``rank`` column.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stethoscope import rundir as rd
from stethoscope.errors import RunDirError
from stethoscope.findings import SEVERITY_RANK


class RunDirWarning(UserWarning):
    """``load_run`` skipped something it could not read in a run directory (the message names the file and
    the lines); the same sentences are in ``run.problems``."""


@dataclass
class Finding:
    """One finding folded from its events."""

    id: str
    code: str
    severity: str  # the worst severity it reached
    target: str | None
    first_step: int | None
    last_step: int | None
    cleared_step: int | None  # None while still open at the end of the run
    value: Any  # the latest value reported
    worst_value: Any
    threshold: Any
    message: str
    hint: str
    rank: int | None
    events: int
    data: dict = field(default_factory=dict)
    caused_by: str | None = None  # id of the finding this one is a consequence of (``data.caused_by``)
    incident: str | None = None  # id of the root finding of its incident (its own id when it is the root)

    @property
    def open(self) -> bool:
        return self.cleared_step is None

    @property
    def members(self) -> list[str]:
        """The targets an aggregated finding stands for (``data.members``); empty for a single target."""
        return list(self.data.get("members") or [])

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"open": self.open}


def fold_findings(events: list[dict]) -> list[Finding]:
    """One :class:`Finding` per id, most severe first, then by first step."""
    folded: dict[str, Finding] = {}
    for ev in events:
        fid = ev.get("id")
        if not fid:
            continue
        kind = ev.get("event")
        f = folded.get(fid)
        if f is None:
            f = Finding(
                id=fid, code=ev.get("code", "?"), severity=ev.get("severity", "info"),
                target=ev.get("target"), first_step=ev.get("step"), last_step=ev.get("step"),
                cleared_step=None, value=ev.get("value"), worst_value=ev.get("value"),
                threshold=ev.get("threshold"), message=ev.get("message", ""), hint=ev.get("hint", ""),
                rank=ev.get("rank"), events=0, data=dict(ev.get("data") or {}),
            )
            folded[fid] = f
        f.events += 1
        if ev.get("step") is not None:
            f.last_step = ev.get("step")
        if kind == "close":
            f.cleared_step = ev.get("step") if ev.get("step") is not None else f.last_step
            continue
        if kind == "open" and f.events > 1:
            f.cleared_step = None  # re-opened after clearing
        sev = ev.get("severity", "info")
        if SEVERITY_RANK.get(sev, 0) > SEVERITY_RANK.get(f.severity, 0):
            f.severity = sev
        f.value = ev.get("value")
        if "worst_value" in ev:  # the writer tracks the worst value in the finding's own direction
            # within one open period the writer's worst is authoritative; a re-opening counts if further
            if kind == "update" or _further(ev["worst_value"], f.worst_value, f.threshold):
                f.worst_value = ev["worst_value"]
        elif kind == "update" or f.worst_value is None:
            f.worst_value = ev.get("value")
        f.threshold = ev.get("threshold", f.threshold)
        f.message = ev.get("message", f.message)
        f.hint = ev.get("hint", f.hint)
        if ev.get("data"):
            f.data.update(ev["data"])
    out = sorted(
        folded.values(),
        key=lambda f: (-SEVERITY_RANK.get(f.severity, 0), f.first_step if f.first_step is not None else -1, f.id),
    )
    _link(out)
    return out


@dataclass
class Incident:
    """Findings that share a cause: the root finding and the findings that opened as its consequences.

    A finding is a consequence when it opened while a run-wide problem was open (``data.caused_by``, written
    by the rules' settle step: a NaN born in the forward pass, a gradient-norm spike); its root is the end of
    that chain. A finding linked to nothing is an incident of its own.
    """

    root: Finding
    consequences: list[Finding] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.root.id

    @property
    def findings(self) -> list[Finding]:
        return [self.root, *self.consequences]

    @property
    def severity(self) -> str:
        return max((f.severity for f in self.findings), key=lambda s: SEVERITY_RANK.get(s, 0))

    @property
    def first_step(self) -> int | None:
        return self.root.first_step

    def as_dict(self) -> dict:
        return {"id": self.id, "severity": self.severity, "root": self.root.id,
                "consequences": [f.id for f in self.consequences]}


def _link(findings: list[Finding]) -> None:
    """Set each finding's ``caused_by`` (a finding of this run it follows from) and ``incident`` (the root of
    that chain, its own id for a root)."""
    by_id = {f.id: f for f in findings}
    for f in findings:
        link = f.data.get("caused_by")
        cause = link.get("id") if isinstance(link, dict) else None
        f.caused_by = cause if cause in by_id and cause != f.id else None
    for f in findings:
        root, seen = f, {f.id}
        while root.caused_by is not None and root.caused_by not in seen:
            seen.add(root.caused_by)
            root = by_id[root.caused_by]
        f.incident = root.id


def incidents_of(findings: list[Finding]) -> list[Incident]:
    """Folded findings (their ``incident`` set by :func:`fold_findings`) grouped: worst incident first, then
    earliest; consequences in the findings' own order (most severe first)."""
    by_id = {f.id: f for f in findings}
    groups: dict[str, Incident] = {}
    for f in findings:
        root = by_id.get(f.incident, f)
        incident = groups.setdefault(root.id, Incident(root))
        if f is not root:
            incident.consequences.append(f)
    return sorted(groups.values(), key=lambda i: (-SEVERITY_RANK.get(i.severity, 0),
                                                   i.first_step if i.first_step is not None else -1, i.id))


def _further(value: Any, worst: Any, threshold: Any) -> bool:
    """True when ``value`` lies further from ``threshold`` than ``worst`` (numbers only)."""
    try:
        v, w, t = float(value), float(worst), float(threshold)
    except (TypeError, ValueError):
        return False
    return abs(v - t) > abs(w - t)


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    """Turn the JSON spellings of ±Inf ("inf", "-inf") back into floats in numeric columns."""
    for col in frame.columns:
        if frame[col].dtype == object and col not in ("kind", "name", "output", "schema_version"):
            values = frame[col]
            if values.isin(["inf", "-inf"]).any():
                converted = pd.to_numeric(values.replace({"inf": np.inf, "-inf": -np.inf}), errors="coerce")
                # only where every non-null entry was a number or an inf spelling
                if converted.notna().sum() == values.notna().sum():
                    frame[col] = converted
    return frame


class Run:
    """A run directory read back. Attributes: ``path``, ``meta``, ``findings``, ``events``, ``problems``
    (what could not be read: one sentence per damaged file, empty for a sound run)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunDirError(f"no run directory at {str(self.path)!r}")
        self.problems: list[str] = []
        self.rank_dirs = sorted(
            (p for p in self.path.glob("rank*") if p.is_dir() and p.name[4:].isdigit()),
            key=lambda p: int(p.name[4:]),
        )
        read: dict[Path, dict | None] = {}

        def meta_of(d: Path) -> dict | None:
            if d not in read:
                found: list[str] = []
                read[d] = rd.read_json(d / rd.META, found)
                for text in found:
                    self._problem(text.replace("; ignored", "; the run's status, model and configuration are "
                                                            "unknown"))
            return read[d]

        top = meta_of(self.path) if self.rank_dirs else None
        merged = bool(top and top.get("merged"))  # rank 0 merged the ranks at close (docs/distributed.md)
        dirs = [self.path] if ((self.path / rd.META).is_file() and not merged) or not self.rank_dirs \
            else self.rank_dirs
        if not any((d / rd.META).is_file() or (d / rd.METRICS).is_file() for d in dirs):
            raise RunDirError(
                f"{str(self.path)!r} is not a stethoscope run directory (no meta.json or metrics.jsonl); "
                "pass the folder given as run_dir"
            )
        self._dirs = dirs
        self.metas = [meta_of(d) or {} for d in dirs]
        self.meta: dict = top if merged else (self.metas[0] if self.metas else {})
        if merged and not top.get("missing_ranks"):  # the merged events; else the ranks' own, read live
            self.events: list[dict] = self._read_jsonl(self.path / rd.FINDINGS, top)
        else:
            self.events = [ev for d, meta in zip(dirs, self.metas, strict=True)
                           for ev in self._read_jsonl(d / rd.FINDINGS, meta)]
        self.findings: list[Finding] = fold_findings(self.events)
        self.incidents: list[Incident] = incidents_of(self.findings)
        self._metrics: pd.DataFrame | None = None
        self._captures: list[dict] | None = None
        self._check_complete(merged)

    # ------------------------------------------------------------------ damage
    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)
            warnings.warn(text, RunDirWarning, stacklevel=4)

    def _read_jsonl(self, path: Path, meta: dict | None) -> list[dict]:
        """A JSONL file's records; damaged lines become one problem sentence for the file. A torn last line
        is expected of a killed writer, but not of a run that finished (its writers were closed)."""
        skipped = rd.Skipped()
        rows = list(rd.read_jsonl(path, skipped))
        if skipped.lines:
            n = len(skipped.lines)
            shown = ", ".join(str(i) for i in skipped.lines[:8]) + (", …" if n > 8 else "")
            self._problem(f"{path}: {n} line{'s' if n != 1 else ''} could not be read and "
                          f"{'were' if n != 1 else 'was'} skipped (line{'s' if n != 1 else ''} {shown})")
        if skipped.torn_last is not None and (meta or {}).get("status") == "finished":
            self._problem(self._truncated(path))
        return rows

    def _truncated(self, path: Path) -> str:
        return (f"{path}: the last line is cut off although the run finished: the file looks truncated, and "
                "what came after that line is lost")

    def _check_complete(self, merged: bool) -> None:
        """Cheap checks that a finished run's files are whole: the findings ``meta.json`` counted at close are
        all there, and ``metrics.jsonl`` does not end in a cut-off line (read fully only when used)."""
        for d, meta in zip(self._dirs, self.metas, strict=True):
            if meta.get("status") != "finished":
                continue
            if self._metrics is None and rd.tail_is_torn(d / rd.METRICS) is not None:
                self._problem(self._truncated(d / rd.METRICS))
        counted = (self.meta.get("verdict") or {}).get("counts") if len(self._dirs) == 1 and not merged else None
        if isinstance(counted, dict) and self.meta.get("status") == "finished":
            expected = sum(v for v in counted.values() if isinstance(v, int))
            if len(self.findings) < expected:
                self._problem(f"{self._dirs[0] / rd.FINDINGS} holds {len(self.findings)} finding(s) but meta.json "
                              f"counted {expected} at close: findings are missing from the file (truncated?)")

    @property
    def metrics(self) -> pd.DataFrame:
        """Every metrics row (all kinds) as one DataFrame; statistic columns are NaN where not applicable."""
        if self._metrics is None:
            frames = []
            for d, meta in zip(self._dirs, self.metas, strict=True):
                rows = self._read_jsonl(d / rd.METRICS, meta)
                if not rows:
                    continue
                frame = _numeric(pd.DataFrame.from_records(rows))
                if len(self._dirs) > 1:
                    frame["rank"] = meta.get("rank", int(d.name[4:]) if d.name[4:].isdigit() else None)
                frames.append(frame)
            self._metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
                columns=["schema_version", "step", "kind", "name"])
        return self._metrics

    @property
    def captures(self) -> list[dict]:
        """The incident folders saved for replay (``incidents/<id>/manifest.json``, docs/replay.md), by step;
        each manifest gains ``folder``, its path relative to the run directory."""
        if self._captures is None:
            out = []
            for d in self._dirs:
                for path in sorted((d / "incidents").glob("*/manifest.json")):
                    manifest = rd.read_json(path)
                    if not isinstance(manifest, dict):
                        self._problem(f"{path}: unreadable, so that incident cannot be replayed")
                        continue
                    manifest["folder"] = path.parent.relative_to(self.path).as_posix()
                    out.append(manifest)
            out.sort(key=lambda m: m.get("step") if isinstance(m.get("step"), int) else -1)
            self._captures = out
        return self._captures

    def capture_of(self, finding: Finding) -> dict | None:
        """The saved folder an incident can be replayed from: the one whose manifest lists ``finding`` (its
        root), else the one saved at the step it opened."""
        for m in self.captures:
            if any(isinstance(f, dict) and f.get("id") == finding.id for f in m.get("findings", [])):
                return m
        if finding.first_step is None:
            return None
        return next((m for m in self.captures if m.get("step") == finding.first_step), None)

    def metrics_of(self, kind: str) -> pd.DataFrame:
        """Rows of one kind (act, input, grad, update, scalar, attn, memory, marker), empty columns dropped."""
        df = self.metrics
        if "kind" not in df:
            return df.iloc[0:0]
        rows = df[df["kind"] == kind]
        # empty statistic columns go; the key columns stay (a step of None, logged before the first step,
        # must not drop "step" and break scalars())
        keep = [c for c in rows.columns if c in ("schema_version", "step", "kind", "name") or rows[c].notna().any()]
        return rows[keep].reset_index(drop=True)

    def scalars(self) -> pd.DataFrame:
        """Logged scalars as a wide frame: one row per step, one column per name (loss, grad_norm, ...)."""
        df = self.metrics_of("scalar")
        if df.empty:
            return pd.DataFrame()
        df = df.assign(value=pd.to_numeric(df["value"], errors="coerce"))
        return df.pivot_table(index="step", columns="name", values="value", aggfunc="last").sort_index()

    @property
    def verdict(self) -> dict:
        """healthy / warning / critical, from the findings (worst severity reached) with counts, the number of
        incidents, and ``cause``: the root of the worst incident (None when healthy)."""
        counts = {"info": 0, "warning": 0, "critical": 0}
        for f in self.findings:
            counts[f.severity] = counts.get(f.severity, 0) + 1
        status = "critical" if counts["critical"] else "warning" if counts["warning"] else "healthy"
        worst = self.incidents[0] if self.incidents and status != "healthy" else None
        cause = None
        if worst is not None:
            r = worst.root
            cause = {"id": r.id, "code": r.code, "target": r.target, "step": r.first_step,
                     "consequences": len(worst.consequences)}
        return {"status": status, "counts": counts,
                "incidents": sum(1 for i in self.incidents if i.severity != "info"), "cause": cause}

    @property
    def status(self) -> str:
        return self.meta.get("status", "unknown")

    def findings_frame(self) -> pd.DataFrame:
        return pd.DataFrame([f.as_dict() for f in self.findings])

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, status={self.status!r}, findings={len(self.findings)}, "
                f"verdict={self.verdict['status']!r})")


def load_run(path: str | Path) -> Run:
    """Read a run directory: ``run.findings`` (folded), ``run.metrics`` / ``run.scalars()`` (DataFrames)."""
    return Run(path)
