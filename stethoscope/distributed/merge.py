"""Rank 0's merge at close: one run directory view over ``rank0/``, ``rank1/``, ...

Layout after the merge (``run_dir`` is the folder handed to every rank's monitor)::

    run_dir/
    ├── meta.json        merged: "merged": true, "ranks", "rank_status", the worst status, the verdict
    ├── findings.jsonl   every rank's finding events in time order (each carries its "rank"; ids end @rank<N>)
    ├── report.md, report.html   the report over all ranks
    ├── rank0/  meta.json metrics.jsonl findings.jsonl heartbeat.json report.md ...
    └── rank1/  ...

Rank 0 waits for the other ranks' ``meta.json`` to leave ``running`` (``finished`` or ``crashed``), at most
``distributed.merge_timeout`` seconds, polling the files (no collective: a dead rank cannot hang the merge).
Ranks still running then are listed in ``missing_ranks`` and their events read live from their folders
by ``st.load_run``.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from stethoscope import rundir as rd

_STATUS_ORDER = {"finished": 0, "running": 1, "crashed": 2}


def rank_dirs(parent: Path) -> list[Path]:
    """``rank{N}`` folders under ``parent``, by rank."""
    return sorted(
        (p for p in Path(parent).glob("rank*") if p.is_dir() and p.name[4:].isdigit()),
        key=lambda p: int(p.name[4:]),
    )


def wait_for_ranks(parent: Path, ranks: list[int], timeout: float, poll: float = 0.2) -> dict[int, str]:
    """Each rank's ``meta.json`` status once none is ``running`` any more, or when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = {}
        for r in ranks:
            meta = rd.read_json(Path(parent) / f"rank{r}" / rd.META) or {}
            statuses[r] = meta.get("status", "missing")
        pending = [r for r, s in statuses.items() if s in ("running", "missing")]
        if not pending or time.monotonic() >= deadline:
            return statuses
        time.sleep(poll)


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(rd.dumps(rec) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge_ranks(
    parent: str | Path,
    world_size: int,
    *,
    timeout: float = 60.0,
    own_rank: int = 0,
    own: dict | None = None,
    poll: float = 0.2,
) -> dict:
    """Merge every rank's findings and meta into ``parent`` (see the module docstring); returns the meta.

    Args:
        parent: the folder holding ``rank{N}/``.
        world_size: how many ranks to expect.
        timeout: seconds to wait for the other ranks to finish.
        own_rank: the calling rank (its own ``meta.json`` is not final yet while it merges).
        own: the calling rank's final facts (``status``, ``last_step``), overriding its file.
    """
    from stethoscope.run import fold_findings

    parent = Path(parent)
    others = [r for r in range(world_size) if r != own_rank]
    statuses = wait_for_ranks(parent, others, timeout, poll)
    metas: dict[int, dict] = {}
    for d in rank_dirs(parent):
        r = int(d.name[4:])
        metas[r] = rd.read_json(d / rd.META) or {}
    own_meta = dict(metas.get(own_rank, {}))
    own_meta.update(own or {})
    metas[own_rank] = own_meta
    statuses[own_rank] = own_meta.get("status", "running")
    for r, meta in metas.items():
        statuses.setdefault(r, meta.get("status", "missing"))

    events: list[dict] = []
    for d in rank_dirs(parent):
        r = int(d.name[4:])
        for ev in rd.read_jsonl(d / rd.FINDINGS):
            if ev.get("rank") is None:  # written before the process group existed: tag it here
                ev["rank"] = r
            events.append(ev)
    events.sort(key=lambda ev: (float(ev.get("time") or 0.0), int(ev.get("rank") or 0)))
    _write_jsonl_atomic(parent / rd.FINDINGS, events)

    folded = fold_findings(events)
    counts = {"info": 0, "warning": 0, "critical": 0}
    for f in folded:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    verdict = "critical" if counts["critical"] else "warning" if counts["warning"] else "healthy"
    worst = max((statuses[r] for r in statuses), key=lambda s: _STATUS_ORDER.get(s, 1), default="finished")
    if worst not in _STATUS_ORDER:
        worst = "running"
    base = metas.get(0) or own_meta
    starts = [m.get("started_at") for m in metas.values() if m.get("started_at")]
    last_steps = [m.get("last_step") for m in metas.values() if isinstance(m.get("last_step"), int)]
    errors = {str(r): m["error"] for r, m in metas.items() if m.get("error")}
    meta: dict[str, Any] = {
        "schema_version": rd.SCHEMA_VERSION,
        "merged": True,
        "status": worst,
        "started_at": min(starts) if starts else None,
        "ended_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "last_step": max(last_steps) if last_steps else None,
        "rank": None,
        "world_size": world_size,
        "ranks": sorted(statuses),
        "rank_status": {str(r): s for r, s in sorted(statuses.items())},
        "missing_ranks": sorted(r for r, s in statuses.items() if s in ("running", "missing")),
        "merged_by": own_rank,
        "versions": base.get("versions", {}),
        "model": base.get("model", {}),
        "optimizer": base.get("optimizer"),
        "config": base.get("config", {}),
        "schedule": base.get("schedule"),
        "verdict": {"status": verdict, "counts": counts},
    }
    if errors:
        meta["error"] = "; ".join(f"rank {r}: {e}" for r, e in errors.items())
        meta["rank_errors"] = errors
    rd.write_json_atomic(parent / rd.META, meta)
    return meta
