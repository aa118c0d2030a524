"""Sharded parameters on two gloo ranks (CPU): FSDP2 (``fully_shard``, DTensor; HSDP), FSDP1 (flat and
``use_orig_params``) and DDP with ``no_sync`` accumulation. The monitor's gradient and update rows must be
those of the *full* parameter, under the user's names, equal to plain-torch statistics of an unsharded
reference model fed every rank's batch (``sharded_worker.py``).

Not run on CPU because torch cannot: FSDP2's ``CPUOffloadPolicy`` (torch 2.13 raises "Cannot access
accelerator device when none is available" without an accelerator).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.distributed as dist

from tests._ranks import launch_ranks

WORKER = Path(__file__).with_name("sharded_worker.py")
SCENARIOS = ("fsdp2", "hsdp", "fsdp1_orig", "fsdp1_flat", "ddp_nosync")
NAMES = {"embed.weight", "embed.bias", "norm.weight", "norm.bias", "block.weight", "block.bias", "head.weight",
         "head.bias"}
STATS = ("count", "nonfinite", "mean", "std", "min", "max", "absmax", "norm", "zero_fraction")

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both ranks run every scenario in one process group (one torch start-up per rank)."""
    out = tmp_path_factory.mktemp("sharded")
    launch_ranks(WORKER, 2, out, *SCENARIOS)
    return out


def _rows(run: Path, rank: int, kind: str) -> list[dict]:
    lines = (run / f"rank{rank}" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _close(got, want, scale: float, rtol: float = 1e-5) -> bool:
    """Equal within float32 rounding of the tensor's own scale (a mean near 0 is judged against |x|max)."""
    got, want = _num(got), _num(want)
    if math.isnan(want):
        return math.isnan(got)
    return abs(got - want) <= rtol * max(abs(want), scale) + 1e-30


def _check_grads(run: Path, rank: int, oracle: list[dict], key: str = "grads") -> int:
    rows = _rows(run, rank, "grad")
    checked = 0
    for o in oracle:
        got = {r["name"]: r for r in rows if r["step"] == o["step"]}
        assert set(got) == NAMES, f"step {o['step']}: names {sorted(got)}"
        for name, want in o[key].items():
            row = got[name]
            assert row["missing"] is False
            scale = want.get("absmax", 0.0)
            for stat in STATS:
                if stat in want:
                    assert _close(row[stat], want[stat], scale), (o["step"], name, stat, row[stat], want[stat])
                    checked += 1
    return checked


def _oracle(run: Path, rank: int) -> list[dict]:
    return json.loads((run / f"oracle_rank{rank}.json").read_text())


@pytest.mark.parametrize("scenario", ["fsdp2", "hsdp", "fsdp1_orig", "fsdp1_flat"])
def test_sharded_gradients_are_full_parameter_statistics(runs, scenario):
    run = runs / scenario
    for rank in (0, 1):
        assert _check_grads(run, rank, _oracle(run, rank)) > 100
    # every rank holds the same full-parameter rows
    strip = [{f"{r['step']}:{r['name']}": {k: r[k] for k in STATS} for r in _rows(run, rank, "grad")}
             for rank in (0, 1)]
    assert json.dumps(strip[0], sort_keys=True) == json.dumps(strip[1], sort_keys=True)


def test_fsdp2_counts_the_whole_parameter_and_a_nan_in_another_ranks_shard(runs):
    run = runs / "fsdp2"
    for rank in (0, 1):
        rows = {(r["step"], r["name"]): r for r in _rows(run, rank, "grad")}
        assert rows[(0, "embed.weight")]["count"] == 42  # 7 x 6, split 4 + 3 rows over the ranks
        assert rows[(0, "embed.weight")]["zero_fraction"] == pytest.approx(2 / 6)  # columns 0, 1 on both shards
        last = rows[(2, "head.weight")]
        assert last["count"] == 15 and last["nonfinite"] == 1  # rank 1's NaN, seen on rank 0 too
    findings = [json.loads(line) for line in (run / "findings.jsonl").read_text().splitlines()]
    nonfinite = {f["rank"] for f in findings if f["code"] == "grad.nonfinite" and f["target"] == "head.weight"}
    assert nonfinite == {0, 1}


@pytest.mark.parametrize("scenario", ["fsdp2", "hsdp", "fsdp1_orig", "fsdp1_flat", "ddp_nosync"])
def test_update_ratios_of_sharded_parameters(runs, scenario):
    run = runs / scenario
    for rank in (0, 1):
        rows = _rows(run, rank, "update")
        for o in _oracle(run, rank):
            got = {r["name"]: r for r in rows if r["step"] == o["step"]}
            assert set(got) == NAMES
            for name, want in o["updates"].items():
                for stat in ("update_norm", "weight_norm"):
                    assert _close(got[name][stat], want[stat], 0.0), (o["step"], name, stat, got[name], want)


def test_ddp_no_sync_reads_the_accumulated_gradient_once_per_optimizer_step(runs):
    run = runs / "ddp_nosync"
    for rank in (0, 1):
        oracle = _oracle(run, rank)
        rows = _rows(run, rank, "grad")
        # one row per parameter and optimizer step, not one per micro-batch
        assert len(rows) == len(oracle) * len(NAMES)
        assert _check_grads(run, rank, oracle) > 100
        # and it is the accumulated gradient: the last micro-batch's alone is far from it
        by = {(r["step"], r["name"]): r for r in rows}
        for o in oracle:
            far = [n for n, w in o["last_micro"].items() if abs(by[(o["step"], n)]["norm"] - w["norm"]) > 0.05 * w["norm"]]
            assert len(far) >= 6, far
