"""Step-time overhead of stethoscope against an uninstrumented baseline, in one process.

Workload (issue 2): GPT-2 from ``GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=8192,
n_positions=256)``, batch 8 x 128, AdamW, ``torch.set_num_threads(2)``, a full training step.

Each round times one step of every variant in a shuffled order on its own copy of the model, so drift
in machine speed hits all variants alike; the ratio of a variant is taken against the baseline step of
the same round. Printed: the median ratio with a bootstrap 95 % interval.

  (a) monitor attached, unsampled step (heartbeat only), hang watchdog on (the default)
  (a0) the same with the watchdog off: (a) / (a0) is the watchdog's own cost (issue 4: <= 1.02)
  (am) the same as (a) with the memory monitor and the flight recorder off: (a) / (am) is their own cost on
       an unsampled step (issue 7: <= 1.02)
  (b) sampled step: statistics of every module output, linear input, gradient and update ratio
      (including the flush that brings them to the host and writes them)
      and, with the default config, attention capture (recomputed probabilities, per-head statistics)
  (b0) the same with ``attention.capture: off``: the monitor core's statistics alone
  (b') the same as (b) with the statistics fused by ``torch.compile`` (``stats.compile: always``; the compile
      itself happens in the warm-up and is not timed)
  (c) the default schedule amortized over a long run: ((every - 1) * a + b) / every
  (d) hand-written reference: a forward hook on every module calling ``.item()`` per statistic
      (mean, std, min, max, zero fraction)
  (e) ``wandb.watch(model, log="all", log_freq=1)`` offline, when wandb is installed
  (t) trace mode (``st.Trace``, in memory) around forward + backward: every module call recorded

Usage: python benchmarks/overhead.py [--rounds 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import random
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=256,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def bootstrap(ratios: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(ratios, size=(n, len(ratios)), replace=True), axis=1)
    return float(np.median(ratios)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def item_hooks(model: torch.nn.Module) -> list:
    """The hand-written reference: five statistics per module output, one .item() each."""
    handles = []

    def hook(module, args, output):
        t = output[0] if isinstance(output, tuple) else output
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1:
            with torch.no_grad():
                _ = (t.mean().item(), t.std().item(), t.min().item(), t.max().item(),
                     (t.abs() < 1e-8).float().mean().item())

    for m in model.modules():
        handles.append(m.register_forward_hook(hook))
    return handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rich.console import Console

    import stethoscope as st
    from stethoscope.console import set_console

    set_console(Console(file=io.StringIO()))  # keep the benchmark output to the table
    base = build()
    variants = {"baseline": base, "a": copy.deepcopy(base), "a0": copy.deepcopy(base), "am": copy.deepcopy(base), "b": copy.deepcopy(base), "b0": copy.deepcopy(base), "bc": copy.deepcopy(base),
                "d": copy.deepcopy(base), "t": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=3e-4) for k, m in variants.items()}
    tmp = tempfile.mkdtemp(prefix="stethoscope-bench-")
    # One monitor per instrumented model; the schedule decides sampled (b) or not (a).
    mon_a = st.Monitor(variants["a"], optimizer=opts["a"], run_dir=f"{tmp}/a", schedule=lambda s: False)
    mon_b = st.Monitor(variants["b"], optimizer=opts["b"], run_dir=f"{tmp}/b", schedule=lambda s: True)
    # (b0) the same with attention capture off: the monitor core's statistics alone (issue 2's row)
    mon_b0 = st.Monitor(variants["b0"], optimizer=opts["b0"], run_dir=f"{tmp}/b0", schedule=lambda s: True,
                        config={"attention": {"capture": "off"}})
    # (b') the same with the statistics fused by torch.compile (stats.compile: always; compiled in warm-up)
    mon_bc = st.Monitor(variants["bc"], optimizer=opts["bc"], run_dir=f"{tmp}/bc", schedule=lambda s: True,
                        config={"stats": {"compile": "always"}})
    mon_a0 = st.Monitor(variants["a0"], optimizer=opts["a0"], run_dir=f"{tmp}/a0", schedule=lambda s: False,
                        config={"watchdog": {"enabled": False}})
    assert mon_a._watchdog is not None and mon_a0._watchdog is None
    mon_am = st.Monitor(variants["am"], optimizer=opts["am"], run_dir=f"{tmp}/am", schedule=lambda s: False,
                        config={"memory": {"enabled": False}, "recorder": {"enabled": False}})
    assert mon_a.extension("memory") is not None and mon_a.extension("recorder") is not None
    assert mon_am.extension("memory") is None and mon_am.extension("recorder") is None
    item_hooks(variants["d"])

    wandb_run = None
    try:
        import wandb

        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", tmp)
        variants["e"] = copy.deepcopy(base)
        opts["e"] = torch.optim.AdamW(variants["e"].parameters(), lr=3e-4)
        wandb_run = wandb.init(project="stethoscope-bench", mode="offline", dir=tmp)
        wandb.watch(variants["e"], log="all", log_freq=1)
    except Exception:
        pass

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 8192, (8, 128), generator=g) for _ in range(4)]
    steps = {k: 0 for k in variants}

    def run(kind: str, batch: torch.Tensor) -> float:
        model, opt = variants[kind], opts[kind]
        i = steps[kind]
        steps[kind] += 1
        t0 = time.perf_counter()
        if kind in ("a", "a0", "am", "b", "b0", "bc"):
            mon = {"a": mon_a, "a0": mon_a0, "am": mon_am, "b": mon_b, "b0": mon_b0, "bc": mon_bc}[kind]
            with mon.step(i):
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            mon.log(loss=loss)
            mon.flush()
        elif kind == "t":
            with st.Trace(model):
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if kind == "e" and wandb_run is not None:
                wandb_run.log({"loss": float(loss)})
        return time.perf_counter() - t0

    kinds = list(variants)
    for w in range(args.warmup):
        for k in kinds:
            run(k, batches[w % len(batches)])
    times: dict[str, list[float]] = {k: [] for k in kinds}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = kinds[:]
        rng.shuffle(order)
        for k in order:
            times[k].append(run(k, batches[r % len(batches)]))
    mon_a.close()
    mon_a0.close()
    mon_am.close()
    mon_b.close()
    mon_b0.close()
    mon_bc.close()
    if wandb_run is not None:
        wandb_run.finish()

    base_t = np.array(times["baseline"])
    every = st.Config().sampling.every
    print(f"workload: GPT-2 6x384, batch 8x128, AdamW, {args.threads} threads, {args.rounds} rounds")
    print(f"baseline step: median {np.median(base_t) * 1e3:.1f} ms")
    print(f"{'variant':58s} {'median':>7s}  95% CI")
    rows = [
        ("(a) monitor attached, unsampled step (watchdog on)", "a"),
        ("(a0) monitor attached, unsampled step, watchdog off", "a0"),
        ("(am) unsampled step, memory monitor + recorder off", "am"),
        ("(b) sampled step, every module/parameter/update + flush", "b"),
        ("(b0) the same, attention capture off (core statistics)", "b0"),
        ("(b') the same, statistics compiled (stats.compile: always)", "bc"),
        ("(d) hand-written .item() hooks, 5 statistics", "d"),
        ("(e) wandb.watch(log='all', log_freq=1)", "e"),
        ("(t) trace mode (st.Trace) around forward + backward", "t"),
    ]
    ratios = {}
    for label, k in rows:
        if k not in times:
            print(f"{label:58s} skipped (wandb not installed)")
            continue
        ratios[k] = np.array(times[k]) / base_t
        med, lo, hi = bootstrap(ratios[k])
        print(f"{label:58s} {med:7.3f}  [{lo:.3f}, {hi:.3f}]")
    amort = ((every - 1) * ratios["a"] + ratios["b"]) / every
    med, lo, hi = bootstrap(amort)
    label = f"(c) default schedule amortized (every={every})"
    print(f"{label:58s} {med:7.3f}  [{lo:.3f}, {hi:.3f}]")
    med, lo, hi = bootstrap(np.array(times["a"]) / np.array(times["a0"]))
    label = "watchdog on, no stall: (a) / (a0) step time"
    print(f"{label:58s} {med:7.3f}  [{lo:.3f}, {hi:.3f}]")
    med, lo, hi = bootstrap(np.array(times["a"]) / np.array(times["am"]))
    label = "memory monitor + recorder on, unsampled: (a) / (am)"
    print(f"{label:58s} {med:7.3f}  [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
