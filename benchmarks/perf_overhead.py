"""The step-time breakdown's own cost: the monitor with ``perf.enabled`` against the monitor without it, same
process, same model, interleaved rounds (so machine noise hits both alike); median of per-round ratios.

    python benchmarks/perf_overhead.py [--steps 200] [--rounds 7]

Two workloads: a small MLP whose step takes about a millisecond (the perf extension's fixed cost shows) and a
wider one (tens of ms per step, closer to real training). Unsampled steps only: that is where the extension
must be cheap (its work on a sampled step hides under the statistics')."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import stethoscope as st


def make(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


def run(model: nn.Module, x: torch.Tensor, steps: int, perf: bool, root: Path, tag: str) -> float:
    """Seconds per step over ``steps`` unsampled steps (after 10 warm-up steps)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    config = {"sampling": {"warmup_steps": 0, "every": 10**9}, "perf": {"enabled": perf},
              "console": {"quiet": True}, "report": {"enabled": False}, "watchdog": {"enabled": False}}
    mon = st.Monitor(model, optimizer=opt, run_dir=root / tag, config=config, overwrite=True)

    def step(i: int) -> None:
        with mon.step(i):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())

    for i in range(10):
        step(i)
    t = time.perf_counter()
    for i in range(10, 10 + steps):
        step(i)
    elapsed = (time.perf_counter() - t) / steps
    mon.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.rounds} rounds x {args.steps} unsampled steps, CPU, 1 thread")
    print(f"{'workload':<28} {'without perf':>13} {'with perf':>11} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, width, depth, batch in (("small MLP (4x64)", 64, 4, 16), ("wider MLP (4x512, batch 64)", 512, 4, 64)):
            model = make(width, depth)
            x = torch.randn(batch, width)
            ratios, base, with_perf = [], [], []
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                got = {p: run(model, x, args.steps, p, root, f"{name[:5]}-{r}-{p}") for p in order}
                base.append(got[False])
                with_perf.append(got[True])
                ratios.append(got[True] / got[False])
            print(f"{name:<28} {1000 * statistics.median(base):>10.3f} ms {1000 * statistics.median(with_perf):>8.3f} ms "
                  f"{statistics.median(ratios):>7.3f}")


if __name__ == "__main__":
    main()
