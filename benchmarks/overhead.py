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

Usage: python benchmarks/overhead.py [--rounds 30] [--threads 2] [--processes 1]
       [--device cuda --model gpt2-124m --autocast bf16 --variants baseline,a,b,d]   (issue 17: the GPU check)

``--processes N`` splits the rounds over N fresh processes and pools their per-round ratios: copies of one model
in one process differ in speed by up to ±1.5 % on a shared VM (memory placement), and each variant steps its own
copy, so a single process can shift a variant's ratio by that much either way.

``--model gpt2-124m`` is GPT-2 12x768 (vocab 50257, random init from a config; batch 8 x 1024 on CUDA,
2 x 256 on CPU unless ``--batch``/``--seq``), ``tiny`` a 2x64 GPT-2 (the dry run of benchmarks/gpu_check.sh),
``ref-tiny`` the reference's layers at width 12 (batch 2 x 8).
On CUDA every timed step ends with ``torch.cuda.synchronize()`` (all variants alike), and the forward runs
under ``--autocast bf16`` when asked.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# name -> (n_layer, n_embd, n_head, vocab, positions, {device: (batch, sequence)})
MODELS = {
    "ref": (6, 384, 6, 8192, 256, {"cpu": (8, 128), "cuda": (8, 128)}),
    "gpt2-124m": (12, 768, 12, 50257, 1024, {"cpu": (2, 256), "cuda": (8, 1024)}),
    "tiny": (2, 64, 2, 512, 128, {"cpu": (2, 32), "cuda": (2, 32)}),
    # the reference's modules and parameters at tiny width: what is left is the fixed cost per module call,
    # tensor and row (benchmarks/sampled_cost.py)
    "ref-tiny": (6, 12, 6, 64, 256, {"cpu": (2, 8), "cuda": (2, 8)}),
}
ALL_VARIANTS = ["baseline", "a", "a0", "am", "b", "b0", "bc", "d", "t"]


def build(seed: int = 0, model: str = "ref"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    n_layer, n_embd, n_head, vocab, positions, _ = MODELS[model]
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=positions,
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODELS), default="ref")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seq", type=int, default=0)
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS),
                        help="comma-separated subset of " + ",".join(ALL_VARIANTS) + " (baseline always runs)")
    parser.add_argument("--processes", type=int, default=1,
                        help="split the rounds over this many fresh processes and pool their ratios (see below)")
    parser.add_argument("--times-json", default="", help=argparse.SUPPRESS)  # a child's raw step times
    args = parser.parse_args()
    if args.processes > 1:
        times = _pooled(args)
        import stethoscope as st

        _report(args, times, st.Config().sampling.every)
        return
    torch.set_num_threads(args.threads)
    wanted = {"baseline", *args.variants.split(",")}
    unknown = wanted - set(ALL_VARIANTS) - {"e"}
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")
    device, cuda = torch.device(args.device), args.device == "cuda"
    vocab, (batch_n, seq_n) = MODELS[args.model][3], MODELS[args.model][5][args.device]
    batch_n, seq_n = args.batch or batch_n, args.seq or seq_n

    from rich.console import Console

    import stethoscope as st
    from stethoscope.console import set_console

    set_console(Console(file=io.StringIO()))  # keep the benchmark output to the table
    base = build(model=args.model).to(device)
    variants = {k: (base if k == "baseline" else copy.deepcopy(base)) for k in ALL_VARIANTS if k in wanted}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=3e-4) for k, m in variants.items()}
    tmp = tempfile.mkdtemp(prefix="stethoscope-bench-")
    # One monitor per instrumented model; the schedule decides sampled (b) or not (a).
    settings = {
        "a": (False, None),
        "b": (True, None),
        # (b0) the same with attention capture off: the monitor core's statistics alone (issue 2's row)
        "b0": (True, {"attention": {"capture": "off"}}),
        # (b') the same with the statistics fused by torch.compile (stats.compile: always; compiled in warm-up)
        "bc": (True, {"stats": {"compile": "always"}}),
        "a0": (False, {"watchdog": {"enabled": False}}),
        "am": (False, {"memory": {"enabled": False}, "recorder": {"enabled": False}}),
    }
    mons = {k: st.Monitor(variants[k], optimizer=opts[k], run_dir=f"{tmp}/{k}",
                          schedule=(lambda s: True) if sampled else (lambda s: False), config=config)
            for k, (sampled, config) in settings.items() if k in variants}
    if "a" in mons and "a0" in mons:
        assert mons["a"]._watchdog is not None and mons["a0"]._watchdog is None
    if "a" in mons and "am" in mons:
        assert mons["a"].extension("memory") is not None and mons["a"].extension("recorder") is not None
        assert mons["am"].extension("memory") is None and mons["am"].extension("recorder") is None
    if "d" in variants:
        item_hooks(variants["d"])

    wandb_run = None
    try:
        if "e" not in args.variants.split(","):
            raise ImportError("not asked for")
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
    batches = [torch.randint(0, vocab, (batch_n, seq_n), generator=g).to(device) for _ in range(4)]
    steps = {k: 0 for k in variants}

    def autocast():
        if args.autocast == "bf16":
            return torch.autocast(args.device, dtype=torch.bfloat16)
        return torch.autocast(args.device, enabled=False)

    def run(kind: str, batch: torch.Tensor) -> float:
        model, opt = variants[kind], opts[kind]
        i = steps[kind]
        steps[kind] += 1
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if kind in mons:
            mon = mons[kind]
            with mon.step(i):
                with autocast():
                    loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            mon.log(loss=loss)
            mon.flush()
        elif kind == "t":
            with st.Trace(model), autocast():
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with autocast():
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if kind == "e" and wandb_run is not None:
                wandb_run.log({"loss": float(loss)})
        if cuda:
            torch.cuda.synchronize()
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
    for mon in mons.values():
        mon.close()
    if wandb_run is not None:
        wandb_run.finish()

    if args.times_json:
        with open(args.times_json, "w") as f:
            json.dump(times, f)
        return
    _report(args, times, st.Config().sampling.every)


def _pooled(args: argparse.Namespace) -> dict[str, list[float]]:
    """The rounds split over ``args.processes`` fresh processes, their per-round times concatenated.

    Why: identical copies of a model in one process differ in speed by up to ±1.5 % on a shared VM (where
    their memory landed: measured 0.983–1.013 for four uninstrumented copies), and each variant steps its own
    copy. Pooling the rounds of several processes averages that luck out of every variant's ratio.
    """
    import subprocess
    import sys

    per = -(-args.rounds // args.processes)  # ceil
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="stethoscope-bench-") as tmp:
        for i in range(args.processes):
            path = f"{tmp}/times-{i}.json"
            cmd = [sys.executable, __file__, "--rounds", str(per), "--threads", str(args.threads), "--warmup",
                   str(args.warmup), "--device", args.device, "--model", args.model, "--autocast", args.autocast,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--variants", args.variants,
                   "--times-json", path]
            subprocess.run(cmd, check=True)
            with open(path) as f:
                for k, v in json.load(f).items():
                    times.setdefault(k, []).extend(v)
    return times


def _report(args: argparse.Namespace, times: dict[str, list[float]], every: int) -> None:
    """The table: each variant's median ratio to the baseline step of the same round, with a 95 % interval."""
    cuda = args.device == "cuda"
    wanted = {"baseline", *args.variants.split(",")}
    base_t = np.array(times["baseline"])
    n_layer, n_embd = MODELS[args.model][:2]
    batch_n, seq_n = MODELS[args.model][5][args.device]
    batch_n, seq_n = args.batch or batch_n, args.seq or seq_n
    where = torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"cpu, {args.threads} threads"
    pooled = f" in {args.processes} processes" if args.processes > 1 else ""
    print(f"workload: GPT-2 {n_layer}x{n_embd} ({args.model}), batch {batch_n}x{seq_n}, AdamW, "
          f"autocast {args.autocast}, {where}, {len(base_t)} rounds{pooled}")
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
            if k not in wanted and k != "e":
                continue
            print(f"{label:58s} skipped (wandb not installed or not asked for)")
            continue
        ratios[k] = np.array(times[k]) / base_t
        med, lo, hi = bootstrap(ratios[k])
        print(f"{label:58s} {med:7.3f}  [{lo:.3f}, {hi:.3f}]")
    if "a" in ratios and "b" in ratios:
        amort = ((every - 1) * ratios["a"] + ratios["b"]) / every
        med, lo, hi = bootstrap(amort)
        label = f"(c) default schedule amortized (every={every})"
        print(f"{label:58s} {med:7.3f}  [{lo:.3f}, {hi:.3f}]")
    if "a" in times and "a0" in times:
        med, lo, hi = bootstrap(np.array(times["a"]) / np.array(times["a0"]))
        label = "watchdog on, no stall: (a) / (a0) step time"
        print(f"{label:58s} {med:7.3f}  [{lo:.3f}, {hi:.3f}]")
    if "a" in times and "am" in times:
        med, lo, hi = bootstrap(np.array(times["a"]) / np.array(times["am"]))
        label = "memory monitor + recorder on, unsampled: (a) / (am)"
        print(f"{label:58s} {med:7.3f}  [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
