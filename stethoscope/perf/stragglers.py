"""Stragglers: each rank's recent phase medians in ``rank{N}/perf.json``, and one rank's phases against the
median rank's.

Why files and not a collective: like the heartbeats (docs/distributed.md), a file read never blocks, so a
slow or dead rank cannot hang the others through the monitor, and nothing is added to the training's
synchronisation. Every ``perf.publish_every`` steps a rank replaces its file (~300 bytes, atomic) and reads
its peers'. It judges only itself, so a straggler's finding is written by the straggler.

Why the median over *all* ranks as the reference: under DDP the ranks meet in the gradient all-reduce inside
backward, so when one rank's forward is slow the others' backward grows by as much (they wait). With three
or more ranks the median rank is a waiting one in the phase holding the collective and a normal one in the
others, so only the phase where the time is really spent stands out. Two ranks cannot say which of them is
slow (the median is their mean, and the waiting rank's backward grows as much as the straggler's forward):
the comparison needs ``world_size >= 3``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from stethoscope import rundir as rd
from stethoscope.perf.phases import STRAGGLER_PHASES, median

PERF_FILE = "perf.json"


def summary(rank: int, window: Any) -> dict:
    """What a rank publishes: its window's step range and the median seconds of each phase (and the total)."""
    steps = list(window.steps)
    return {
        "schema_version": rd.SCHEMA_VERSION,
        "rank": rank,
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "steps": len(steps),
        "medians": window.medians((*STRAGGLER_PHASES, "total")),
        "published": time.time(),
    }


def publish(parent: Path, rank: int, data: dict) -> None:
    path = Path(parent) / f"rank{rank}" / PERF_FILE
    if path.parent.is_dir():
        rd.write_json_atomic(path, data, indent=None)


def read_peers(parent: Path, world_size: int) -> dict[int, dict]:
    """Every rank's published summary that could be read (a missing or torn file is left out)."""
    out = {}
    for r in range(world_size):
        data = rd.read_json(Path(parent) / f"rank{r}" / PERF_FILE)
        if isinstance(data, dict) and isinstance(data.get("medians"), dict):
            out[r] = data
    return out


def compare(own: int, summaries: dict[int, dict], min_steps: int, max_lag: int) -> dict[str, dict] | None:
    """``own``'s phases against the median rank's: ``{phase: {ratio, excess, reference, own, ranks}}``.

    None when the comparison cannot be made: fewer than three ranks published, a rank's window holds fewer
    than ``min_steps`` steps, or a rank's window ends more than ``max_lag`` steps away from ``own``'s (ranks
    that do not step together are not compared).
    """
    me = summaries.get(own)
    if me is None or len(summaries) < 3 or me.get("last_step") is None:
        return None
    for s in summaries.values():
        if (s.get("steps") or 0) < min_steps or s.get("last_step") is None:
            return None
        if abs(int(s["last_step"]) - int(me["last_step"])) > max_lag:
            return None
    step_ref = median(float(s["medians"].get("total", math.nan)) for s in summaries.values())
    out: dict[str, dict] = {}
    for phase in STRAGGLER_PHASES:
        per_rank = {r: float(s["medians"].get(phase, math.nan)) for r, s in sorted(summaries.items())}
        ref = median(per_rank.values())
        mine = per_rank[own]
        if not (math.isfinite(ref) and math.isfinite(mine)):
            continue
        out[phase] = {
            "ratio": mine / ref if ref > 0 else (math.inf if mine > 0 else 1.0),
            "excess": mine - ref,
            "excess_share": (mine - ref) / step_ref if step_ref and step_ref > 0 else math.nan,
            "reference": ref,
            "own": mine,
            "ranks": {str(r): v for r, v in per_rank.items()},
        }
    return out
