"""One rank of the four-process straggler test (gloo, CPU, DDP), started by test_stragglers.py.

    python straggler_worker.py RANK WORLD_SIZE PORT OUT_DIR

Three monitors in a row over the same process group, each in its own run folder under OUT_DIR:

* ``healthy`` — every rank "loads" its batch for DATA s and spends FWD s in the module ``block``;
* ``slow`` — the same, but rank SLOW_FWD spends FWD × FACTOR in ``block`` (a 1.5× slower forward) and also
  waits DATA_EXTRA s more for its batches (one straggler, two slow phases: with half the ranks slow the median
  rank would be a slow one, docs/distributed.md);
* ``hang`` — rank HANG_RANK sleeps HANG s inside ``block`` at step 2, past the watchdog's 1 s stall limit.

Sleeps, not computation, make the phases: on a loaded 2-core machine a sleep lasts at least its length, so
the healthy run's ranks differ only by the machine's noise. The process group times out after 90 s.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import stethoscope as st

STEPS = 40
DATA, DATA_EXTRA = 0.004, 0.020
FWD, FACTOR = 0.030, 1.5
SLOW_FWD = SLOW_DATA = 2  # one straggler: the median rank must be one of the waiting ones
HANG_RANK, HANG = 3, 2.5
STATE = {"mode": "healthy", "step": -1}


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        rank, mode = dist.get_rank(), STATE["mode"]
        if mode == "hang":
            if rank == HANG_RANK and STATE["step"] == 2:
                time.sleep(HANG)
        else:
            time.sleep(FWD * (FACTOR if mode == "slow" and rank == SLOW_FWD else 1.0))
        return torch.relu(self.lin(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.block = Block(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def train(model, opt, run_dir: str, mode: str, steps: int, rank: int) -> None:
    STATE["mode"] = mode
    config = {
        "sampling": {"warmup_steps": 2, "every": 1000},
        "perf": {"window": 20, "publish_every": 5, "persist": 3, "every": 5},
        "watchdog": {"stall_seconds": 1.0 if mode == "hang" else 60.0, "first_call_stall_seconds": 1.0
                     if mode == "hang" else 60.0, "repeat_seconds": 60.0},
        "distributed": {"heartbeat_seconds": 0.2, "merge_timeout": 60.0},
        "report": {"plots": False},
        "console": {"quiet": True},
    }
    mon = st.Monitor(model, optimizer=opt, run_dir=run_dir, config=config)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(steps):
        STATE["step"] = step
        if mode != "hang":  # the batch's "loading"
            time.sleep(DATA + (DATA_EXTRA if mode == "slow" and rank == SLOW_DATA else 0.0))
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
    mon.close()
    dist.barrier()  # rank 0 merged before the next monitor starts


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    torch.manual_seed(0)
    model = DistributedDataParallel(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for mode, steps in (("healthy", STEPS), ("slow", STEPS), ("hang", 4)):
        train(model, opt, os.path.join(out, mode), mode, steps, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
