"""Extra peak memory of a monitored training step: sampled vs unsampled vs no monitor (issue 17, item 3).

Each configuration runs in a fresh subprocess (so one configuration's allocations never hide in another's
freed-but-kept pages): build the model and AdamW, run warm-up steps (optimizer state allocated, the monitor's
first sampled step and its compile, if any, done), then measure ``--repeat`` steps, each as

    peak during the step (forward, backward, optimizer step, the monitor's flush) - memory before the step

and report the median. CPU: resident set size; the peak is the kernel's ``VmHWM`` after resetting it through
``/proc/self/clear_refs`` before each step (tracemalloc does not see torch's allocator; torch's CPU allocator
caches nothing, so a freed tensor leaves RSS at once). CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. "extra" is a configuration's peak step delta minus the unmonitored one's.

Workloads: ``gpt2-124m`` (GPT-2 12x768, vocab 50257, random init from a config) and ``long`` (GPT-2 4x256 at
4096 tokens, SDPA attention: the case where the monitor's attention capture would hold a T x T matrix if it
were not computed in blocks). Configurations:

  none        no monitor
  unsampled   monitor attached (default config), step not sampled
  sampled     default config, sampled step (update ratios within stats.update_budget_mb = 256 MiB)
  full-copy   sampled, stats.update_budget_mb: null (every parameter copied: the behaviour before the budget)
  no-attn     sampled, attention.capture: off (what attention capture adds, by difference with "sampled")

Usage: python benchmarks/memory_overhead.py [--device cpu|cuda] [--workload gpt2-124m long] [--threads 2]
       [--batch B --seq T] [--dtype bf16]   (bf16: autocast on CUDA)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

CONFIGS = {
    "none": None,
    "unsampled": {},
    "sampled": {},
    "full-copy": {"stats": {"update_budget_mb": None}},
    "no-attn": {"attention": {"capture": "off"}},
}
# (n_layer, n_embd, n_head, vocab, positions, default batch, default sequence length on CPU / CUDA)
WORKLOADS = {
    "gpt2-124m": (12, 768, 12, 50257, 1024, {"cpu": (2, 256), "cuda": (8, 1024)}),
    "long": (4, 256, 4, 8192, 4096, {"cpu": (1, 4096), "cuda": (4, 4096)}),
    "tiny": (2, 64, 2, 512, 256, {"cpu": (2, 64), "cuda": (2, 64)}),  # the dry run of benchmarks/gpu_check.sh
}
MiB = 2**20


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak RSS (Linux >= 4.0)
        f.write("5")


def child(args: argparse.Namespace) -> None:
    """One configuration in this process; prints one JSON line."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from rich.console import Console
    from transformers import GPT2Config, GPT2LMHeadModel

    import stethoscope as st
    from stethoscope.console import set_console

    torch.set_num_threads(args.threads)
    set_console(Console(file=io.StringIO()))
    n_layer, n_embd, n_head, vocab, positions, sizes = WORKLOADS[args.workload[0]]
    batch, seq = sizes[args.device]
    batch, seq = args.batch or batch, args.seq or seq
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=positions,
                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = CONFIGS[args.config]
    mon = None
    if extra is not None:
        sampled = args.config != "unsampled"
        mon = st.Monitor(model, opt, run_dir=Path(tempfile.mkdtemp(prefix="st-mem-")) / "run",
                         config={"report": {"plots": False}, **extra}, schedule=lambda s: sampled)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (batch, seq), generator=g).to(args.device) for _ in range(2)]
    cuda = args.device == "cuda"
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and args.dtype == "bf16"
           else torch.autocast(args.device, enabled=False))

    def step(i: int) -> None:
        x = ids[i % 2]  # (batch, seq) token ids
        if mon is None:
            with amp:
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return
        with mon.step(i):
            with amp:
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
        mon.flush()  # the flush (the one transfer, rules, metrics) belongs to the sampled step's cost

    for i in range(args.warmup):
        step(i)
    deltas, peaks = [], []
    for i in range(args.warmup, args.warmup + args.repeat):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_hwm()
            before = _rss()
        step(i)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _hwm()
        deltas.append(peak - before)
        peaks.append(peak)
    if mon is not None:
        mon.close()
    print(json.dumps({"config": args.config, "delta": statistics.median(deltas), "peak": statistics.median(peaks),
                      "deltas": deltas, "param_bytes": param_bytes, "batch": batch, "seq": seq}))


def run_config(args: argparse.Namespace, workload: str, config: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--config", config, "--workload", workload, "--device", args.device,
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--repeat", str(args.repeat),
           "--dtype", args.dtype]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{workload}/{config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workload", nargs="+", default=["gpt2-124m", "long"], choices=list(WORKLOADS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seq", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (CUDA only)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    what = "RSS (VmHWM - VmRSS before the step)" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"peak memory of one training step, {args.device}, {what}; median of {args.repeat} steps, "
          f"fresh process per configuration")
    print(f"{'workload':32s} {'configuration':10s} {'step peak':>10s} {'extra vs none':>14s} "
          f"{'vs unsampled':>13s}")
    for workload in args.workload:
        results = {c: run_config(args, workload, c) for c in args.configs}
        first = next(iter(results.values()))
        n_layer, n_embd = WORKLOADS[workload][:2]
        label = (f"{workload} {n_layer}x{n_embd} {first['batch']}x{first['seq']} "
                 f"({first['param_bytes'] / MiB:.0f} MiB params)")
        base = results.get("none", {}).get("delta")
        unsampled = results.get("unsampled", {}).get("delta")
        for c, r in results.items():
            vs_none = "" if base is None or c == "none" else f"{(r['delta'] - base) / MiB:+.1f} MiB"
            vs_uns = ("" if unsampled is None or c in ("none", "unsampled")
                      else f"{(r['delta'] - unsampled) / MiB:+.1f} MiB")
            print(f"{label:32s} {c:10s} {r['delta'] / MiB:8.1f} MiB {vs_none:>14s} {vs_uns:>13s}")
            label = ""


if __name__ == "__main__":
    main()
