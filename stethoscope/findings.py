"""Findings: what is wrong, where, how bad, and what usually fixes it — as open/update/close events.

A finding opens when a condition starts; while it holds it is not repeated every step: an ``update``
event is written only when it gets worse (higher severity, or a value further past its threshold), and a
``close`` event when it clears. ``load_run`` folds the events back into one finding per ``id``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stethoscope.rundir import SCHEMA_VERSION, JsonlWriter

SEVERITIES = ("info", "warning", "critical")
SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}

# A worsening must move the value by this relative amount before an update event is written,
# so a slowly drifting value does not write a line per step.
_UPDATE_STEP = 0.10


def finding_id(code: str, target: str | None, rank: int | None = None) -> str:
    """The stable identity of a finding: one per (code, target[, rank])."""
    base = f"{code}:{target or '-'}"
    return base if rank is None else f"{base}@rank{rank}"


def _locked(fn: Callable) -> Callable:
    """Serialise a FindingLog method: the watchdog thread reports findings too."""

    @functools.wraps(fn)
    def wrapper(self: FindingLog, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper


@dataclass
class OpenFinding:
    """A finding that is open now (the folded state of its events so far)."""

    id: str
    code: str
    severity: str
    target: str | None
    first_step: int | None
    value: Any
    worst_value: Any
    threshold: Any
    message: str
    hint: str
    higher_is_worse: bool = True
    data: dict = field(default_factory=dict)


class FindingLog:
    """Writes finding events and tracks which findings are open.

    Args:
        writer: the ``findings.jsonl`` writer (None keeps events in memory only).
        rank: the process rank written into each event (None when not distributed).
        on_open: called with each event dict whose finding just opened or was raised in severity
            (the monitor uses it for the console and for ``stop_on``).
    """

    def __init__(
        self,
        writer: JsonlWriter | None,
        rank: int | None = None,
        on_open: Callable[[dict], None] | None = None,
    ):
        self._writer = writer
        self.rank = rank
        self._on_open = on_open
        self.open: dict[str, OpenFinding] = {}
        self.counts = {s: 0 for s in SEVERITIES}  # findings ever opened, by their worst severity
        self._worst: dict[str, str] = {}  # id -> worst severity seen (for the counts)
        self.recent: list[dict] = []  # events since the console last asked
        self.events = 0  # events emitted so far (the monitor saves its state when this moved)
        self._lock = threading.RLock()

    def _emit(self, event: str, f: OpenFinding, step: int | None, value: Any) -> dict:
        self.events += 1
        record = {
            "schema_version": SCHEMA_VERSION,
            "id": f.id,
            "event": event,
            "step": step,
            "code": f.code,
            "severity": f.severity,
            "target": f.target,
            "value": value,
            "worst_value": f.worst_value,
            "threshold": f.threshold,
            "message": f.message,
            "hint": f.hint,
            "rank": self.rank,
            "data": f.data,
            "time": time.time(),
        }
        if self._writer is not None:
            self._writer.write(record)
            self._writer.flush()
        return record

    def _count(self, f: OpenFinding) -> None:
        old = self._worst.get(f.id)
        if old is not None and SEVERITY_RANK[old] >= SEVERITY_RANK[f.severity]:
            return
        if old is not None:
            self.counts[old] -= 1
        self.counts[f.severity] += 1
        self._worst[f.id] = f.severity

    @_locked
    def report(
        self,
        code: str,
        target: str | None,
        severity: str,
        value: Any,
        threshold: Any,
        message: str,
        hint: str,
        step: int | None,
        data: dict | None = None,
        higher_is_worse: bool = True,
    ) -> dict | None:
        """Say that a condition holds now; returns the event written, or None when nothing new happened."""
        if severity not in SEVERITY_RANK:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        fid = finding_id(code, target, self.rank)
        current = self.open.get(fid)
        if current is None:
            current = OpenFinding(
                fid, code, severity, target, step, value, value, threshold, message, hint,
                higher_is_worse, dict(data or {}),
            )
            self.open[fid] = current
            self._count(current)
            record = self._emit("open", current, step, value)
            self.recent.append(record)
            if self._on_open is not None:
                self._on_open(record)
            return record
        raised = SEVERITY_RANK[severity] > SEVERITY_RANK[current.severity]
        worse = _is_worse(value, current.worst_value, higher_is_worse)
        if not raised and not worse:
            return None
        current.severity = max(severity, current.severity, key=SEVERITY_RANK.__getitem__)
        current.value = value
        if worse:
            current.worst_value = value
        current.threshold, current.message, current.hint = threshold, message, hint
        if data:
            current.data.update(data)
        self._count(current)
        record = self._emit("update", current, step, value)
        self.recent.append(record)
        if raised and self._on_open is not None:
            self._on_open(record)
        return record

    @_locked
    def clear(self, code: str, target: str | None, step: int | None, value: Any = None) -> dict | None:
        """Say that a condition no longer holds; writes a ``close`` event if the finding was open."""
        fid = finding_id(code, target, self.rank)
        current = self.open.pop(fid, None)
        if current is None:
            return None
        return self._emit("close", current, step, value)

    def is_open(self, code: str, target: str | None) -> bool:
        return finding_id(code, target, self.rank) in self.open

    @_locked
    def take_recent(self) -> list[dict]:
        out, self.recent = self.recent, []
        return out

    def verdict(self) -> dict:
        """healthy / warning / critical from the worst severity ever opened, with counts."""
        counts = dict(self.counts)
        if counts["critical"]:
            status = "critical"
        elif counts["warning"]:
            status = "warning"
        else:
            status = "healthy"
        return {"status": status, "counts": counts}

    @_locked
    def state_dict(self) -> dict:
        return {
            "open": {k: vars(v) | {"data": dict(v.data)} for k, v in self.open.items()},
            "counts": dict(self.counts),
            "worst": dict(self._worst),
        }

    @_locked
    def load_state_dict(self, state: dict) -> None:
        self.open = {k: OpenFinding(**v) for k, v in state.get("open", {}).items()}
        self.counts = {s: int(state.get("counts", {}).get(s, 0)) for s in SEVERITIES}
        self._worst = dict(state.get("worst", {}))


def _is_worse(value: Any, worst: Any, higher_is_worse: bool) -> bool:
    """True when ``value`` is past ``worst`` by more than the update step (numbers only)."""
    try:
        v, w = float(value), float(worst)
    except (TypeError, ValueError):
        return False
    if v != v:  # NaN is never "worse" than itself
        return False
    if w != w:
        return True
    if higher_is_worse:
        return v > w + _UPDATE_STEP * abs(w) if w != 0 else v > 0
    return v < w - _UPDATE_STEP * abs(w) if w != 0 else v < 0
