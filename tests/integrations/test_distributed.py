"""torch.distributed: two gloo ranks under DDP, one stuck in a module; heartbeats, merge, reduced statistics."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

import stethoscope as st
from stethoscope import rundir as rd
from stethoscope.distributed.extension import reduce_stats
from stethoscope.distributed.heartbeats import BACKWARD, RankHeartbeats, activity_of
from stethoscope.distributed.merge import merge_ranks
from stethoscope.integrations._driver import pick_run_dir
from stethoscope.stats import finalize, tensor_stats
from tests._ranks import launch_ranks

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two DDP ranks (gloo) trained 4 steps; rank 1 sleeps 3 s inside `block` at step 2."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    launch_ranks(WORKER, 2, run_dir, logs=run_dir.parent, timeout=120)
    return run_dir


def test_merged_run_names_the_stuck_rank_and_the_waiting_one(ddp_run):
    meta = json.loads((ddp_run / "meta.json").read_text())
    assert meta["merged"] is True and meta["ranks"] == [0, 1] and meta["status"] == "finished"
    assert meta["rank_status"] == {"0": "finished", "1": "finished"} and meta["missing_ranks"] == []

    run = st.load_run(ddp_run)
    assert run.meta["merged"] and {int(m["rank"]) for m in run.metas} == {0, 1}
    stalls = {f.rank: f for f in run.findings if f.code == "hang.stall"}
    assert set(stalls) == {0, 1}
    stuck, waiting = stalls[1], stalls[0]
    # rank 1: stuck inside the module `block`, in user code; rank 0 waits for it
    assert stuck.target == "block" and stuck.data["classification"] == "user code"
    assert stuck.data["stuck_ranks"] == [1] and stuck.data["waiting_ranks"] == [0]
    assert "rank 1 is stuck in its forward, inside <model> > block" in stuck.message
    assert "rank 0 waits for it (in backward: the gradient all-reduce inside backward)" in stuck.message
    # rank 0: in backward (DDP's all-reduce runs in C++), classified as waiting for rank 1
    assert waiting.data["classification"] == "collective"
    assert waiting.data["ranks"]["0"]["activity"] == BACKWARD
    assert "rank 0 waits in backward for rank 1" in waiting.message
    assert waiting.data["ranks"]["1"]["stack"] == ["<model>", "block"]
    # both stalls cleared once rank 1 woke up
    assert stuck.cleared_step is not None and waiting.cleared_step is not None

    # the merged findings file carries both ranks' events, each tagged
    events = list(rd.read_jsonl(ddp_run / "findings.jsonl"))
    assert {e["rank"] for e in events} == {0, 1}
    # the report at the top names them too
    report = (ddp_run / "report.md").read_text()
    assert "block (rank 1)" in report and "rank 0 waits in backward for rank 1" in report
    # each dump has the ranks section; heartbeats were published and closed
    dump = next((ddp_run / "rank0").glob("hang-*.txt")).read_text()
    assert "rank 1: stuck" in dump and "rank 0: waiting" in dump
    for r in (0, 1):
        beat = json.loads((ddp_run / f"rank{r}" / "heartbeat.json").read_text())
        assert beat["rank"] == r and beat["status"] == "closed" and beat["world_size"] == 2


def test_findings_command_reads_the_merged_run(ddp_run, monkeypatch, capsys):
    from stethoscope import cli

    monkeypatch.setattr(sys, "argv", ["stethoscope", "findings", str(ddp_run), "--json", "--fail-on", "warning"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1  # the stalls are warnings
    data = json.loads(capsys.readouterr().out)
    assert {(f["code"], f["rank"]) for f in data["findings"]} >= {("hang.stall", 0), ("hang.stall", 1)}


def test_reduced_gradient_statistics_count_ddp_replicas_once(ddp_run):
    run = st.load_run(ddp_run)
    own = run.metrics_of("grad")
    reduced = run.metrics_of("grad_reduced")
    assert not reduced.empty and set(reduced["step"]) == {0, 1, 2, 3}
    merged = own.merge(reduced, on=["rank", "step", "name"], suffixes=("", "_all"))
    assert len(merged) == len(reduced)
    # DDP all-reduced the gradients before they were read: identical on both ranks, so counted once
    assert (merged["count"] == merged["count_all"]).all()
    assert merged["norm_all"].to_numpy() == pytest.approx(merged["norm"].to_numpy(), rel=1e-6)
    both = own.pivot_table(index=["step", "name"], columns="rank", values="norm")
    assert both[0].to_numpy() == pytest.approx(both[1].to_numpy(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- units


def _stats(t: torch.Tensor):
    return finalize(tensor_stats(t, 1e-8, 3.0).double().cpu().numpy(), t.numel())


def test_reduce_stats_combines_shards_like_the_whole_tensor():
    torch.manual_seed(0)
    full = torch.randn(1000, dtype=torch.float64) * 3
    full[:100] = 0.0
    shards = [_stats(full[:400]), _stats(full[400:])]
    out = reduce_stats([{"w": shards[0]}, {"w": shards[1]}])["w"]
    ref = _stats(full)
    for key in ("count", "mean", "std", "min", "max", "absmax", "norm", "zero_fraction", "saturation_fraction"):
        assert getattr(out, key) == pytest.approx(getattr(ref, key), rel=1e-5, abs=1e-7), key  # float32 sums
    # a parameter only one rank holds (FSDP: an empty shard elsewhere) passes through
    assert reduce_stats([{"w": shards[0]}, {}])["w"] == shards[0]


def test_activity_of_a_thread_blocked_in_backward():
    frames = [("/x/train.py", 10, "main"), ("/site-packages/torch/_tensor.py", 623, "backward"),
              ("/site-packages/torch/autograd/graph.py", 979, "_engine_run_backward")]
    assert activity_of(frames)[0] == BACKWARD
    # user code called from the engine (a custom autograd Function) is not "waiting"
    assert activity_of([*frames, ("/x/model.py", 5, "backward")])[0] == "user code"
    assert activity_of([("/x/train.py", 3, "main"),
                        ("/torch/distributed/distributed_c10d.py", 9, "all_reduce")])[0] == "collective"


def test_silent_rank_is_named(tmp_path):
    from stethoscope.heartbeat import Heartbeat

    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank1").mkdir()
    hb = Heartbeat()
    hb.step, hb.in_step = 5, True
    hb.stack[:] = ["", "encoder"]
    hb.stamp = time.monotonic() - 10
    beats = RankHeartbeats(tmp_path, 0, 2, period=0.1)
    beats.publish(hb, None, force=True)
    old = {"rank": 1, "step": 5, "stack": [], "last_move": time.time() - 60, "published": time.time() - 60,
           "activity": "user code", "status": "running"}
    rd.write_json_atomic(tmp_path / "rank1" / "heartbeat.json", old)

    class Dog:
        class config:
            stall_seconds = 2.0

    data = beats.attribute(Dog(), json.loads((tmp_path / "rank0" / "heartbeat.json").read_text()))
    assert data["stuck_ranks"] == [0] and data["silent_ranks"] == [1]
    assert "rank 0 is stuck inside <model> > encoder" in data["message"]
    assert "rank 1 is silent (heartbeat not refreshed" in data["message"]


def test_merge_waits_a_bounded_time_for_a_rank_that_never_finishes(tmp_path):
    for r, status in ((0, "running"), (1, "running")):
        (tmp_path / f"rank{r}").mkdir()
        rd.write_json_atomic(tmp_path / f"rank{r}" / "meta.json", {"status": status, "rank": r, "last_step": 2})
        with open(tmp_path / f"rank{r}" / "findings.jsonl", "w") as fh:
            fh.write(json.dumps({"id": f"grad.nonfinite:w@rank{r}", "event": "open", "code": "grad.nonfinite",
                                 "severity": "critical", "target": "w", "step": 1, "rank": r, "time": 1.0 + r})
                     + "\n")
    t0 = time.monotonic()
    meta = merge_ranks(tmp_path, 2, timeout=0.5, own={"status": "finished", "last_step": 3}, poll=0.05)
    assert time.monotonic() - t0 < 3.0
    assert meta["missing_ranks"] == [1] and meta["status"] == "running"
    assert meta["rank_status"] == {"0": "finished", "1": "running"} and meta["last_step"] == 3
    assert meta["verdict"]["status"] == "critical"
    run = st.load_run(tmp_path)  # a missing rank: events are read live from the rank folders
    assert {f.rank for f in run.findings} == {0, 1}


def test_pick_run_dir_keeps_every_rank_in_one_folder(tmp_path):
    base = tmp_path / "stethoscope"
    assert pick_run_dir(base, 1) == base
    (base / "rank0").mkdir(parents=True)
    (base / "rank0" / "meta.json").write_text("{}")
    assert pick_run_dir(base, 1) == base  # rank 0 started first: rank 1 joins the same folder
    assert pick_run_dir(base, 0) == base.with_name("stethoscope-2")  # a new launch moves on
    (base / "meta.json").write_text("{}")  # merged: the whole folder is taken
    assert pick_run_dir(base, 1) == base.with_name("stethoscope-2")
    assert pick_run_dir(base, None) == base.with_name("stethoscope-2")
