"""Attention-logit growth induced on real text: `attn.logit_growth` opens before the loss diverges.

A 2-layer Llama (no QK-norm) and its twin with QK-norm (Qwen3: the same architecture with an RMSNorm on each
head's q and k) learn the characters of UD English EWT at a high constant learning rate with AdamW, seeded, on
the CPU, monitored on every step. Prints, for each run: the step `attn.logit_growth` opened (with layer and
heads), the step the loss diverged (its moving average rising `--rise` nats above its lowest value), the gap,
and the largest max logit seen.

    python benchmarks/logit_growth.py                 # the documented run (docs/attention.md)
    python benchmarks/logit_growth.py --steps 120     # shorter
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DATA = Path("/work/shared/data/ud-english-ewt/en_ewt-ud-dev.conllu")


def corpus(path: Path = DATA) -> tuple[torch.Tensor, int]:
    """The `# text = ` sentences as one character stream: (ids, vocabulary size)."""
    lines = [line[9:].strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("# text = ")]
    text = "\n".join(lines)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), len(chars)


def model(qk_norm: bool, vocab: int, hidden: int = 64, layers: int = 2, heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    if qk_norm:
        return Qwen3ForCausalLM(Qwen3Config(head_dim=hidden // heads, **kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


def divergence_step(losses: list[float], rise: float, beta: float = 0.9, after: int = 20) -> int | None:
    """First step whose loss moving average is `rise` nats above the lowest average so far (after `after`)."""
    ema, low = None, float("inf")
    for step, loss in enumerate(losses):
        ema = loss if ema is None else beta * ema + (1 - beta) * loss
        if step >= after:
            if ema >= low + rise:
                return step
            low = min(low, ema)
    return None


def train(qk_norm: bool, steps: int, lr: float, run_dir: Path, batch: int = 16, length: int = 64,
          config: dict | None = None) -> dict:
    import stethoscope as st

    data, vocab = corpus()
    net = model(qk_norm, vocab)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    cfg = {"console": {"quiet": True}, "sampling": {"warmup_steps": steps}, "watchdog": {"enabled": False},
           "trace": {"profile": False}, **(config or {})}
    mon = st.Monitor(net, opt, run_dir=run_dir, config=cfg)
    g = torch.Generator().manual_seed(0)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        ix = torch.randint(0, len(data) - length - 1, (batch,), generator=g)
        x = torch.stack([data[i : i + length] for i in ix])  # (B, T) characters
        with mon.step(step):
            loss = net(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach())
        losses.append(float(loss.detach()))
    mon.close()
    seconds = time.perf_counter() - t0
    run = st.load_run(run_dir)
    opened = [f for f in run.findings if f.code == "attn.logit_growth"]
    attn = run.metrics_of("attn")
    top = attn.groupby("step")["max_logit"].max() if len(attn) else None  # per step, over layers and heads
    return {"opened": opened, "losses": losses, "max_logit": float(top.max()) if top is not None else None,
            "trace": {int(k): float(v) for k, v in top.items()} if top is not None else {}, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--rise", type=float, default=0.15, help="nats the loss average must rise to count as diverged")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-twin", action="store_true", help="only the run without QK-norm")
    p.add_argument("--verbose", action="store_true", help="loss (mean of 10 steps) and max logit every 10 steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    for qk_norm in (False, True)[: 1 if args.no_twin else 2]:
        name = "qwen3 (QK-norm)" if qk_norm else "llama (no QK-norm)"
        with tempfile.TemporaryDirectory() as tmp:
            r = train(qk_norm, args.steps, args.lr, Path(tmp))
        first = min(r["opened"], key=lambda f: f.first_step) if r["opened"] else None
        div = divergence_step(r["losses"], args.rise)
        out[name] = {
            "logit_growth_step": first.first_step if first else None,
            "where": f"{first.target} heads {first.data.get('heads')}" if first else None,
            "divergence_step": div,
            "gap_steps": (div - first.first_step) if first and div is not None else None,
            "largest_max_logit": round(r["max_logit"], 1) if r["max_logit"] else None,
            "best_loss": round(min(r["losses"]), 3),
            "final_loss_avg10": round(sum(r["losses"][-10:]) / 10, 3),
            "seconds": round(r["seconds"], 1),
        }
        if args.verbose:
            for i in range(0, len(r["losses"]), 10):
                print(f"  {i:4d} loss {sum(r['losses'][i:i + 10]) / len(r['losses'][i:i + 10]):.3f}  "
                      f"max logit {r['trace'].get(i, float('nan')):.4g}")
        print(name, json.dumps(out[name]), flush=True)


if __name__ == "__main__":
    main()
