"""One rank of the sharded-parameter tests (gloo, CPU), started by test_sharded.py as a subprocess.

    python sharded_worker.py RANK WORLD_SIZE PORT OUT_DIR SCENARIO [SCENARIO ...]

Each scenario trains a small model with the monitor (every step sampled) next to an unsharded reference
copy that sees every rank's batch, and writes ``OUT_DIR/<scenario>/oracle_rank{R}.json``: plain-torch
statistics of the reference's full gradients and updates, which the test compares with the monitor's rows.
The process group times out after 60 s, so nothing can hang the suite.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import stethoscope as st

STEPS = 3
LR = 0.1
MICRO = 4  # micro-batches per optimizer step (ddp_nosync)
NAN_PARAM = "head.weight"  # fsdp2: rank 1 writes a NaN into its part of this gradient on the last step


class Net(nn.Module):
    """Uneven first dimensions (7, 5, 3 rows over 2 ranks), a LayerNorm (weights ~1: a dominant mean)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.block = nn.Linear(7, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(self.norm(self.embed(x)))))


def batch(step: int, rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    x[:, :2] = 0.0  # embed.weight's first two columns get exact-zero gradients (zero_fraction 2/6)
    return x, y


def oracle(t: torch.Tensor) -> dict:
    """Statistics of a full tensor with plain torch, float64."""
    t = t.detach().double().reshape(-1)
    finite = t[torch.isfinite(t)]
    out = {"count": t.numel(), "nonfinite": int(t.numel() - finite.numel())}
    if finite.numel():
        out |= {"mean": finite.mean().item(), "std": finite.std().item() if finite.numel() > 1 else 0.0,
                "min": finite.min().item(), "max": finite.max().item(), "absmax": finite.abs().max().item(),
                "norm": finite.norm().item(), "zero_fraction": (finite == 0).double().mean().item()}
    return out


def reference_step(ref: nn.Module, step: int, world: int, micro: int) -> dict[str, torch.Tensor]:
    """Full gradients the sharded / data-parallel model should hold: the mean over ranks of each rank's
    loss (summed over micro-batches), on an unsharded copy."""
    ref.zero_grad(set_to_none=True)
    for m in range(micro):
        for r in range(world):
            x, y = batch(step, r, m)
            ((ref(x) - y).pow(2).mean() / world).backward()
    return {n: p.grad.detach().clone() for n, p in ref.named_parameters()}


def wrap(scenario: str, model: nn.Module, world: int) -> nn.Module:
    if scenario == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.embed, mesh=mesh)
        fully_shard(model.block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if scenario == "hsdp":  # FSDP2 on a (replicate 2, shard 1) mesh: replicas must count once
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
        fully_shard(model.block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if scenario in ("fsdp1_orig", "fsdp1_flat"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        uop = scenario == "fsdp1_orig"
        cpu = torch.device("cpu")
        model.block = FSDP(model.block, use_orig_params=uop, device_id=cpu)
        return FSDP(model, use_orig_params=uop, device_id=cpu)
    if scenario == "ddp_nosync":
        return nn.parallel.DistributedDataParallel(model)
    raise ValueError(scenario)


def run(scenario: str, rank: int, world: int, out: Path) -> None:
    torch.manual_seed(0)
    ref = Net()
    model = wrap(scenario, copy.deepcopy(ref), world)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    config = {"watchdog": {"enabled": False}, "report": {"enabled": False}, "console": {"quiet": True},
              "distributed": {"merge_timeout": 30.0}}
    mon = st.Monitor(model, optimizer=opt, run_dir=out / scenario, config=config, schedule=lambda s: True)
    micro = MICRO if scenario == "ddp_nosync" else 1
    steps: list[dict] = []
    for step in range(STEPS):
        full = reference_step(ref, step, world, micro)
        with mon.step(step):
            for m in range(micro):
                x, y = batch(step, rank, m)
                last = m == micro - 1
                ctx = model.no_sync() if scenario == "ddp_nosync" and not last else _null()
                with ctx:
                    (model(x) - y).pow(2).mean().backward()
            if scenario == "fsdp2" and step == STEPS - 1:
                _inject_nan(model, rank, full, ref)
            before = {n: p.detach().clone() for n, p in ref.named_parameters()}
            opt.step()
            ref_opt.step()
            opt.zero_grad(set_to_none=True)
        steps.append({
            "step": step,
            "grads": {n: oracle(g) for n, g in full.items()},
            "updates": {n: {"update_norm": (p.detach() - before[n]).double().norm().item(),
                            "weight_norm": before[n].double().norm().item()} for n, p in ref.named_parameters()},
            # the last micro-batch's gradient alone: what a per-micro-batch reading would have seen
            "last_micro": ({n: oracle(g) for n, g in _last_micro(ref, step, world).items()}
                           if micro > 1 else None),
        })
    mon.close()
    (out / scenario / f"oracle_rank{rank}.json").write_text(json.dumps(steps, allow_nan=True))


def _last_micro(ref: nn.Module, step: int, world: int) -> dict[str, torch.Tensor]:
    probe = copy.deepcopy(ref)
    for p in probe.parameters():
        p.grad = None
    for r in range(world):
        x, y = batch(step, r, MICRO - 1)
        ((probe(x) - y).pow(2).mean() / world).backward()
    return {n: p.grad for n, p in probe.named_parameters()}


def _inject_nan(model: nn.Module, rank: int, full: dict[str, torch.Tensor], ref: nn.Module) -> None:
    """NaN at rank 1's first local entry of NAN_PARAM's gradient (Shard(0): the global row after rank 0's)."""
    p = dict(model.named_parameters())[NAN_PARAM]
    local = p.grad.to_local()
    rows0 = full[NAN_PARAM].shape[0] - (local.shape[0] if rank == 1 else full[NAN_PARAM].shape[0] - local.shape[0])
    if rank == 1:
        local[0, 0] = math.nan
    full[NAN_PARAM][rows0, 0] = math.nan
    ref.get_parameter(NAN_PARAM).grad[rows0, 0] = math.nan  # the reference's update goes NaN too


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # FSDP1's deprecation notice
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for scenario in sys.argv[5:]:
            run(scenario, rank, world, out)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
