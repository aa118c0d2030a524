"""Four gloo ranks under DDP (CPU): a healthy run stays silent; one rank's 1.5× slower forward and slower
data pipeline are named; a hang names the rank behind, its phase and module, and what the others
wait in. One set of four processes runs all three (tests/perf/straggler_worker.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import stethoscope as st
from tests._ranks import launch_ranks

WORKER = Path(__file__).with_name("straggler_worker.py")
WORLD = 4
sys.path.insert(0, str(Path(__file__).parent))
import straggler_worker as W  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stragglers")
    launch_ranks(WORKER, WORLD, out)
    return out


def _findings(run_dir: Path, code: str) -> list:
    return [f for f in st.load_run(run_dir).findings if f.code == code]


def test_a_healthy_run_stays_silent(runs):
    run = st.load_run(runs / "healthy")
    assert run.meta["merged"] and run.meta["ranks"] == [0, 1, 2, 3]
    loud = [(f.rank, f.code, f.target, f.message) for f in run.findings if f.code.startswith(("dist.", "perf."))]
    assert loud == []
    perf = run.metrics_of("perf")
    assert set(perf["rank"]) == {0, 1, 2, 3}
    # the phases were measured, not guessed: every rank's forward holds the worker's sleep
    fwd = perf.groupby("rank")["forward_ms"].median()
    assert (fwd >= 1000 * W.FWD).all() and (fwd < 3 * 1000 * W.FWD).all()


def test_a_slower_forward_and_a_slower_input_pipeline_are_named(runs):
    found = {(f.rank, f.target): f for f in _findings(runs / "slow", "dist.straggler")}
    assert set(found) == {(W.SLOW_FWD, f"rank{W.SLOW_FWD}.forward"), (W.SLOW_DATA, f"rank{W.SLOW_DATA}.data")}
    fwd = found[(W.SLOW_FWD, f"rank{W.SLOW_FWD}.forward")]
    assert 1.3 <= fwd.value <= 2.0  # the worker's 1.5× (the forward also holds a little compute)
    assert f"rank {W.SLOW_FWD}'s forward is" in fwd.message and "× the median rank's" in fwd.message
    assert fwd.data["phase"] == "forward" and set(fwd.data["ranks"]) == {"0", "1", "2", "3"}
    assert "for " in fwd.message and fwd.data["steps"] >= 15
    data = found[(W.SLOW_DATA, f"rank{W.SLOW_DATA}.data")]
    assert data.value >= 2.0 and data.severity == "critical"
    # the ranks that wait for them in backward (DDP's all-reduce) are not called slow
    assert not any(f.target.endswith(".backward") for f in _findings(runs / "slow", "dist.straggler"))
    # its slow input pipeline may also make it input-bound (its data wait is ~30 % of the step); no other rank is
    assert {f.rank for f in _findings(runs / "slow", "perf.input_bound")} <= {W.SLOW_DATA}
    # the merged report's step-time section shows every rank's phases
    report = (runs / "slow" / "report.md").read_text()
    assert "## Step time" in report and all(f"| rank {r} |" in report for r in range(WORLD))


def test_a_hang_names_the_rank_behind_its_phase_and_what_the_others_wait_in(runs):
    stalls = {f.rank: f for f in _findings(runs / "hang", "hang.stall")}
    assert set(stalls) == set(range(WORLD))
    behind = stalls[W.HANG_RANK]
    assert behind.target == "block" and behind.data["phase"] == "forward"
    assert behind.data["stuck_ranks"] == [W.HANG_RANK]
    assert sorted(behind.data["waiting_ranks"]) == [0, 1, 2]
    assert f"rank {W.HANG_RANK} is stuck in its forward, inside <model> > block" in behind.message
    assert "ranks 0, 1, 2 wait for it (in backward: the gradient all-reduce inside backward)" in behind.message
    for r in (0, 1, 2):
        waiting = stalls[r]
        assert waiting.data["phase"] == "backward"
        assert waiting.data["ranks"][str(r)]["collective"] == "the gradient all-reduce inside backward"
        assert f"rank {r} waits in backward for rank {W.HANG_RANK}" in waiting.message
        assert waiting.data["ranks"][str(W.HANG_RANK)]["phase"] == "forward"
    dump = next((runs / "hang" / "rank0").glob("hang-*.txt")).read_text()
    assert f"rank {W.HANG_RANK}: stuck" in dump and "phase: forward" in dump
