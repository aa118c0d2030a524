"""The distributed extension: heartbeats per rank, optional cross-rank gradient statistics, rank 0's merge.

Built only when ``torch.distributed`` is initialised with more than one process (the monitor then writes
``run_dir/rank{N}/``). It

* hands the watchdog a :class:`~stethoscope.distributed.heartbeats.RankHeartbeats`, so each rank publishes
  ``rank{N}/heartbeat.json`` and a stall finding names the stuck rank and the waiting ones;
* with ``distributed.reduce_grad_stats``, gathers every rank's gradient statistics on *scheduled* sampled
  steps (the steps every rank samples; anomaly-triggered ones are each rank's own) and writes the combined
  ones as ``kind: "grad_reduced"`` rows and a ``grad_norm_all_ranks`` scalar into each rank's
  ``metrics.jsonl`` (:func:`reduce_stats` says how ranks combine);
* on rank 0 at close, merges the ranks (:func:`~stethoscope.distributed.merge.merge_ranks`) and writes the
  report over all of them into ``run_dir/``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from stethoscope import rundir as rd
from stethoscope.collector import merge_stats
from stethoscope.distributed.heartbeats import RankHeartbeats
from stethoscope.distributed.merge import merge_ranks
from stethoscope.extensions import Extension
from stethoscope.record import StepRecord
from stethoscope.stats import _IDX, RAW_WIDTH, STAT_COLUMNS, Stats


def _raw_of(st: Stats) -> tuple[np.ndarray, int]:
    """A published :class:`Stats` back into a raw row (sum, deviation norm, counts), so ranks merge exactly."""
    raw = np.full(RAW_WIDTH, math.nan)
    n = st.count - st.nonfinite
    raw[_IDX["nonfinite"]] = st.nonfinite
    if n > 0:
        raw[_IDX["sum"]] = st.mean * n
        raw[_IDX["dev_norm"]] = st.std * math.sqrt(n - 1) if n > 1 else 0.0
        raw[_IDX["min"]], raw[_IDX["max"]], raw[_IDX["absmax"]] = st.min, st.max, st.absmax
        raw[_IDX["zero"]] = st.zero_fraction * n
        raw[_IDX["saturated"]] = st.saturation_fraction * n
    return raw, st.count


def _same(a: Stats, b: Stats) -> bool:
    """Replicas: the same gradient on two ranks (DDP after its all-reduce) has the same statistics."""
    if a.count != b.count or a.nonfinite != b.nonfinite:
        return False
    for x, y in ((a.norm, b.norm), (a.absmax, b.absmax), (a.zero_fraction, b.zero_fraction)):
        if x != y and not (math.isnan(x) and math.isnan(y)) and abs(x - y) > 1e-6 * max(abs(x), abs(y)):
            return False
    return True


def reduce_stats(per_rank: list[dict[str, Stats]]) -> dict[str, Stats]:
    """Combine each parameter's gradient statistics over the ranks.

    Ranks whose statistics of a parameter are identical hold replicas (DDP: gradients are all-reduced before
    they are read) and count once, so the result equals each rank's own. Otherwise they hold different parts
    (FSDP shards, or ranks that skipped DDP's synchronisation with ``no_sync``) and are combined as one
    tensor: counts and sums add up, min/max/absmax are the extremes, the norm is the root of the summed
    squares, fractions are of all entries.
    """
    names: dict[str, None] = {}
    for d in per_rank:
        names.update(dict.fromkeys(d))
    out: dict[str, Stats] = {}
    for name in names:
        parts = [d[name] for d in per_rank if name in d]
        if all(_same(parts[0], p) for p in parts[1:]):
            out[name] = parts[0]
            continue
        out[name] = merge_stats([_raw_of(p) for p in parts if p.count > 0] or [_raw_of(parts[0])], 0, None)
    return out


class DistributedExtension(Extension):
    """See the module docstring."""

    name = "distributed"

    def __init__(self, run: Any):
        self._run = run
        self.rank: int = run.rank
        self.world_size: int = run.world_size
        self.parent = Path(run.run_dir).parent
        self.config = run.config.distributed
        self.heartbeats = RankHeartbeats(self.parent, self.rank, self.world_size, self.config.heartbeat_seconds)
        self._attached = False
        self.merged: dict | None = None

    # ------------------------------------------------------------------ heartbeats
    def _attach(self) -> None:
        self._attached = True
        dog = self._run.watchdog
        if dog is None:
            return  # no watchdog, no heartbeat files (docs/distributed.md)
        dog.peers = self.heartbeats
        self.heartbeats.publish(self._run.heartbeat, dog.training_thread, force=True)

    def begin_step(self, step: int, sampled: bool) -> None:
        if not self._attached:
            self._attach()

    # ------------------------------------------------------------------ cross-rank gradient statistics
    def observe(self, record: StepRecord) -> None:
        if not self.config.reduce_grad_stats or not record.sampled or record.step is None:
            return
        run = self._run
        if not bool(run.schedule(record.step)):
            return  # only steps that every rank samples: a collective must be entered by all of them
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        local = {name: rec.stats for name, rec in record.grads.items()}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        reduced = reduce_stats([g or {} for g in gathered])
        base = {"schema_version": rd.SCHEMA_VERSION, "step": record.step}
        total = 0.0
        for name, st in reduced.items():
            run.write_metrics(base | {"kind": "grad_reduced", "name": name, "ranks": len(gathered),
                            **{k: getattr(st, k) for k in STAT_COLUMNS}})
            if st.norm == st.norm:
                total += st.norm * st.norm
        if reduced:
            run.write_metrics(base | {"kind": "scalar", "name": "grad_norm_all_ranks",
                                      "value": math.sqrt(total)})
        run.flush_metrics()

    # ------------------------------------------------------------------ close
    def close(self, status: str) -> None:
        run = self._run
        dog = run.watchdog
        self.heartbeats.mark_closed(run.heartbeat, None)
        if dog is not None:
            dog.peers = None
        if self.rank != 0:
            return
        self.merged = merge_ranks(
            self.parent, self.world_size, timeout=self.config.merge_timeout, own_rank=self.rank,
            own={"status": status, "last_step": run.last_step},
        )
        if run.config.report.enabled:
            from stethoscope.report import write_report

            write_report(self.parent, plots=run.config.report.plots)

    def detach(self) -> None:
        dog = self._run.watchdog
        if dog is not None:
            dog.peers = None

    def state_dict(self) -> dict:
        return {}


def extension(run: Any) -> DistributedExtension | None:
    """The extension when the monitor runs in a process group of more than one rank; None otherwise."""
    if run.rank is None:
        return None
    return DistributedExtension(run)
