"""One rank of the two-process DDP test (gloo, CPU), started by test_distributed.py as a subprocess.

    python ddp_worker.py RANK WORLD_SIZE PORT RUN_DIR

Rank 1 sleeps inside the module ``block`` at step 2 for SLEEP seconds, past the watchdog's 1 s stall limit;
rank 0 meanwhile waits in backward for DDP's all-reduce. Each rank trains 4 steps with the monitor and
closes it; rank 0 merges the ranks. The process group times out after 60 s, so nothing can hang the suite.
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

SLEEP = 3.0
SLEEP_RANK, SLEEP_STEP = 1, 2
CURRENT = {"step": -1}


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        if dist.get_rank() == SLEEP_RANK and CURRENT["step"] == SLEEP_STEP:
            time.sleep(SLEEP)  # the "hang": a slow rank inside one module
        return torch.relu(self.lin(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.block = Block(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def main() -> None:
    rank, world, port, run_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = DistributedDataParallel(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = {
        "watchdog": {"stall_seconds": 1.0, "first_call_stall_seconds": 1.0, "repeat_seconds": 60.0},
        "distributed": {"reduce_grad_stats": True, "heartbeat_seconds": 0.2, "merge_timeout": 30.0},
        "report": {"plots": False},
        "console": {"quiet": True},
    }
    mon = st.Monitor(model, optimizer=opt, run_dir=run_dir, config=config)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data shard
    for step in range(4):
        CURRENT["step"] = step
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
    mon.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
