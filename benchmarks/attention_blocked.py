"""Memory and time of the attention statistics at T = 512 … 8192: blocked (online softmax) vs the full matrix.

Each measurement runs in a fresh process: the queries and keys of one causal sequence (SDPA's ``is_causal``,
no mask tensor) are built, the resident set size is read, the statistics row is computed, and the peak RSS
above that baseline is the *extra* memory the statistics needed. The full-matrix path materialises
(nh, T, T) scores and probabilities (plus temporaries); the blocked path one (nh, block_queries, block_keys)
tile at a time, so its extra memory stays flat in T.

    python benchmarks/attention_blocked.py                     # T = 512 … 8192, both paths
    python benchmarks/attention_blocked.py --lengths 512 1024 --heads 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(method: str, t: int, heads: int, head_size: int, bq: int, bk: int, threads: int) -> dict:
    import resource
    import time

    import torch

    from stethoscope.attention.blocked import blocked_statistics
    from stethoscope.attention.capture import AttentionCall
    from stethoscope.attention.checks import head_statistics

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, t, head_size, generator=g)  # (B, nh, T, hs)
    k = torch.randn(1, heads, t, head_size, generator=g)
    call = AttentionCall(name="x", module=None, query=q, key=k, scaling=head_size**-0.5, causal=True,
                         implicit_causal=True, implementation="sdpa")
    # warm the code paths on a tiny call, so imports and first-use allocations are not counted
    small = AttentionCall(**{**call.__dict__, "query": q[:, :, :8], "key": k[:, :, :8]})
    blocked_statistics(small, block_queries=bq, block_keys=bk)
    head_statistics(small)
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    t0 = time.perf_counter()
    row = blocked_statistics(call, block_queries=bq, block_keys=bk) if method == "blocked" else head_statistics(call)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"method": method, "T": t, "seconds": round(seconds, 3), "extra_MiB": round(max(0, peak - base) / 2**20, 1),
            "row_finite": bool(torch.isfinite(row[:-2]).all())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--block-queries", type=int, default=128)
    p.add_argument("--block-keys", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["blocked", "full"])
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        method, t = args.child[0], int(args.child[1])
        print(json.dumps(measure(method, t, args.heads, args.head_size, args.block_queries, args.block_keys,
                                 args.threads)))
        return
    print("| T | method | time (s) | peak extra memory (MiB) | full (nh, T, T) float32 (MiB) |")
    print("|---|---|---|---|---|")
    for t in args.lengths:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", method, str(t), "--heads", str(args.heads), "--head-size",
                   str(args.head_size), "--block-queries", str(args.block_queries), "--block-keys",
                   str(args.block_keys), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"| {t} | {method} | {r['seconds']} | {r['extra_MiB']} | {args.heads * t * t * 4 / 2**20:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
