"""Where a sampled step's time goes: the monitor's own time in each of its parts, per sampled step.

    python benchmarks/sampled_cost.py [--steps 20] [--threads 2] [--model ref|ref-tiny] [--config JSON]

Every hook body, rule and extension of the monitor runs through its error guard
(:class:`stethoscope.monitor.guard.ErrorGuard`); this script times each outermost guarded call and the rest of
the flush, on the reference GPT-2 of ``benchmarks/overhead.py`` (6 layers, 384 wide, batch 8x128, AdamW, every
step sampled), interleaved with an uninstrumented copy whose step time is printed beside it.

Why beside overhead.py: its ratios see the whole step, and on a shared VM they move by about 2 % between runs
(copies of one model differ by up to 1.5 %, rounds drift) — more than most single changes. The monitor's own
time, read directly, gives each part to about a millisecond; its total comes within a few ms of the step-time
difference (the rest is the hooks' own dispatch, outside the guard).

``--model ref-tiny`` keeps the modules, parameters and layers but makes every tensor tiny (width 12, batch 2x8):
what is left is the fixed cost per module call, tensor and metrics row (Python and kernel launches).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import re
import statistics
import tempfile
import time
import warnings
from collections import defaultdict

import torch
from overhead import MODELS, build  # the same workloads (this folder is on the path when run as a script)

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# a guarded place whose ``where`` starts with one of these is a row of its own (one rule, extension or flush
# stage); the others are cut at " of " (one row for the forward hooks of all modules, not one per module)
_KEEP_WHOLE = ("rule", "extension", "writing", "checking", "saving")


def part(where: str) -> str:
    """The table row a guarded call's ``where`` counts in."""
    return where if where.startswith(_KEEP_WHOLE) else re.sub(r" of .*", "", where)


class GuardTimer:
    """Seconds spent in the outermost guarded calls, per part (nested calls count in their outer one)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    def install(self):
        from stethoscope.monitor.guard import ErrorGuard

        original = ErrorGuard.__call__
        timer = self

        def timed(guard, where, fn, *args):
            if timer._depth:
                return original(guard, where, fn, *args)
            timer._depth += 1
            start = time.perf_counter()
            try:
                return original(guard, where, fn, *args)
            finally:
                timer.seconds[part(where)] += time.perf_counter() - start
                timer._depth -= 1

        ErrorGuard.__call__ = timed
        return lambda: setattr(ErrorGuard, "__call__", original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=["ref", "ref-tiny"], default="ref")
    parser.add_argument("--config", default="", help='monitor config as JSON, e.g. \'{"attention": {"capture": "off"}}\'')
    args = parser.parse_args()
    config = json.loads(args.config) if args.config else None
    torch.set_num_threads(args.threads)

    from rich.console import Console

    import stethoscope as st
    from stethoscope.console import set_console

    set_console(Console(file=io.StringIO()))  # keep the output to the table
    base = build(model=args.model)
    vocab, shape = MODELS[args.model][3], MODELS[args.model][5]["cpu"]
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
    watched = copy.deepcopy(base)
    opt_base = torch.optim.AdamW(base.parameters(), lr=3e-4)
    opt = torch.optim.AdamW(watched.parameters(), lr=3e-4)
    mon = st.Monitor(watched, optimizer=opt, run_dir=tempfile.mkdtemp(prefix="stethoscope-cost-"),
                     schedule=lambda s: True, config=config)
    timer = GuardTimer()
    restore = timer.install()  # after the monitor is built: nothing to put back if building it fails

    def plain_step() -> float:
        start = time.perf_counter()
        loss = base(input_ids=ids, labels=ids).loss
        loss.backward()
        opt_base.step()
        opt_base.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def watched_step(i: int) -> float:
        start = time.perf_counter()
        with mon.step(i):
            loss = watched(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss)
        guarded = sum(timer.seconds.values())
        flush_start = time.perf_counter()
        mon.flush()
        timer.seconds["flush (outside the guarded parts)"] += (
            time.perf_counter() - flush_start - (sum(timer.seconds.values()) - guarded))
        return time.perf_counter() - start

    try:
        for i in range(args.warmup):
            plain_step()
            watched_step(i)
        timer.seconds.clear()
        plain, watched_times = [], []
        for i in range(args.steps):
            plain.append(plain_step())
            watched_times.append(watched_step(args.warmup + i))
        ms = {k: 1e3 * v / args.steps for k, v in timer.seconds.items()}  # before close() adds its own
        mon.close()
    finally:
        restore()

    total = sum(ms.values())
    b, w = 1e3 * statistics.median(plain), 1e3 * statistics.median(watched_times)
    n_layer, n_embd = MODELS[args.model][:2]
    print(f"GPT-2 {n_layer}x{n_embd} ({args.model}), batch {shape[0]}x{shape[1]}, {args.threads} threads, "
          f"{args.steps} sampled steps" + (f", config {args.config}" if args.config else ""))
    print(f"step: uninstrumented {b:.1f} ms, sampled {w:.1f} ms (difference {w - b:.1f} ms, ratio {w / b:.3f})")
    print(f"the monitor's own time per sampled step: {total:.1f} ms")
    for name, value in sorted(ms.items(), key=lambda kv: -kv[1]):
        if value >= 0.05:
            print(f"  {name:48s} {value:7.2f} ms  {100 * value / total:5.1f} %")


if __name__ == "__main__":
    main()
