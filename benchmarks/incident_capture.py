"""What incident capture costs on steps without an incident, and what one incident writes.

Workload: the overhead benchmark's GPT-2 (``GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=8192,
n_positions=256)``, batch 8 x 128, AdamW, a full training step), unsampled steps (the monitor's heartbeat
only: the cheapest steps, where a fixed cost shows most). Each round times one step of every variant, in a
shuffled order, each on its own copy of the model; a variant's ratio is taken against the same round's
``base`` step. Printed: the median ratio with a bootstrap 95 % interval.

  base        monitor attached, ``incidents.enabled: false``
  refs        ``incidents.weights: after_step``: the forward pre-hook keeping references + RNG states
  default     ``incidents.weights: before_step`` (the default): also the total gradient norm read at the
              optimizer's step pre-hook (one device-to-host read per step)

Then one incident (a +inf weight) on the same model: bytes written and the capture's own time.

Usage: python benchmarks/incident_capture.py [--rounds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VARIANTS = {
    "base": {"enabled": False},
    "refs": {"weights": "after_step"},
    "default": {},
}


def build(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=256))


def config(incidents: dict) -> dict:
    return {"console": {"quiet": True}, "report": {"enabled": False}, "watchdog": {"enabled": False},
            "incidents": incidents}


def bootstrap(ratios: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(ratios, size=(n, len(ratios)), replace=True), axis=1)
    return float(np.median(ratios)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def main() -> None:
    import stethoscope as st

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base_model = build()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (8, 128), generator=g)  # (B, T)
    tmp = Path(tempfile.mkdtemp(prefix="incident-bench-"))
    runs = {}
    for name, inc in VARIANTS.items():
        model = copy.deepcopy(base_model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        mon = st.Monitor(model, opt, run_dir=tmp / name, config=config(inc), schedule=lambda s: False)
        runs[name] = (model, opt, mon)

    def one_step(name: str, step: int) -> float:
        model, opt, mon = runs[name]
        t0 = time.perf_counter()
        with mon.step(step):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
        mon.flush()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    order = list(VARIANTS)
    for r in range(args.warmup + args.rounds):
        random.Random(r).shuffle(order)
        for name in order:
            dt = one_step(name, r)
            if r >= args.warmup:
                times[name].append(dt)
    base = np.array(times["base"])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds; "
          f"base step median {np.median(base) * 1e3:.1f} ms")
    for name in VARIANTS:
        if name == "base":
            continue
        med, lo, hi = bootstrap(np.array(times[name]) / base)
        print(f"  {name:8s} step / base step: {med:.4f}  (95% CI {lo:.4f} - {hi:.4f})")

    # one incident on the default variant: a +inf weight in the first block's MLP
    model, opt, mon = runs["default"]
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    one_step("default", args.warmup + args.rounds)
    for _, _, m in runs.values():
        m.close()
    folder = tmp / "default" / "incidents" / f"step-{args.warmup + args.rounds}"
    manifest = json.loads((folder / "manifest.json").read_text())
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    print(f"  incident: {', '.join(f'{k} {v:,} B' for k, v in sizes.items())}; "
          f"weights {manifest['weights']['when']}; capture {manifest['capture_seconds'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
