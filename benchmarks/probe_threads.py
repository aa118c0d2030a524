"""How many CPU threads feature extraction should use (``representations[].threads``).

The issue behind the option: on a 2-core machine, extraction with two torch threads ran 4-8x slower than
with one. This measures ``extract_features`` itself (hooks, pooling, memory-mapped writes) on two backbones
at each thread count, interleaved so a burst of load elsewhere hits every setting alike:

* ``bert``: a BERT the shape of all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads; random weights: speed does
  not depend on them), 32 sentences x 48 tokens per batch, every block tapped, ``mean`` pooling;
* ``lstm``: a 3-layer ``nn.LSTM`` speaker encoder (40 mel bins -> 256), 16 utterances x 100-200 frames per
  packed batch, every layer tapped (``lstm.layers.k``, recomputed) plus the final state.

Run: ``python benchmarks/probe_threads.py [--threads 1 2 4] [--repeats 5] [--items 128] [--busy 1]``
(``--busy N``: N processes spin a core each meanwhile, as other jobs do on a shared machine). Prints items per
second for each backbone and thread count (median of the repeats, and the spread), and the ratio to one
thread. docs/probing.md holds the numbers this chose the default from.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stethoscope.probe.features import ModelInputs, ProbeAdapter, extract_features, resolve_layers
from stethoscope.probe.manifest import ProbeItem


def bert_case(n: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    model = BertModel(cfg)
    rng = np.random.default_rng(0)
    items = [ProbeItem(index=i, id=str(i), text=str(int(rng.integers(24, 48)))) for i in range(n)]

    def preprocess(batch):
        lengths = torch.tensor([int(it.text) for it in batch])
        t = int(lengths.max())
        ids = torch.randint(1000, 20000, (len(batch), t), generator=torch.Generator().manual_seed(t))
        mask = (torch.arange(t)[None] < lengths[:, None]).long()  # (B, T)
        return {"input_ids": ids, "attention_mask": mask}

    adapter = ProbeAdapter(model, preprocess)
    return adapter, resolve_layers(model, "all"), items, np.array([int(it.text) for it in items]), 32


class SpeakerEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(40, 256, num_layers=3, batch_first=True)
        self.proj = torch.nn.Linear(256, 256)

    def forward(self, packed):
        _, (h, _) = self.lstm(packed)
        return self.proj(h[-1])


def lstm_case(n: int):
    torch.manual_seed(0)
    model = SpeakerEncoder()
    rng = np.random.default_rng(0)
    items = [
        ProbeItem(index=i, id=str(i), audio=rng.normal(size=(int(rng.integers(100, 200)), 40)).astype(np.float32))
        for i in range(n)
    ]

    def preprocess(batch):
        seqs = [torch.from_numpy(it.audio) for it in batch]
        padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # (B, T, 40)
        lengths = torch.tensor([len(s) for s in seqs])
        packed = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        return ModelInputs(args=(packed,))

    layers = {f"l{k}": f"lstm.layers.{k}" for k in range(3)} | {"h_n": "lstm:output[1][0]"}
    return ProbeAdapter(model, preprocess), layers, items, np.array([len(it.audio) for it in items]), 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--items", type=int, default=128)
    ap.add_argument("--cases", nargs="+", default=["bert", "lstm"])
    ap.add_argument("--busy", type=int, default=0, help="background processes spinning a core each, "
                    "standing in for the other jobs of a shared machine")
    args = ap.parse_args()
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        run(args)
    finally:
        for p in spinners:
            p.terminate()


def _spin() -> None:
    x = 0
    while True:
        x += 1


def run(args) -> None:
    print(
        f"cpu cores: {os.cpu_count()}  torch {torch.__version__}  default threads: {torch.get_num_threads()}  "
        f"busy processes: {args.busy}  load average: {os.getloadavg()[0]:.2f}"
    )
    cases = {"bert": bert_case, "lstm": lstm_case}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            adapter, layers, items, lengths, bs = cases[name](args.items)
            times: dict[int, list[float]] = {t: [] for t in args.threads}
            for r in range(args.repeats + 1):  # the first round warms up and is not counted
                for t in args.threads:
                    start = time.perf_counter()
                    extract_features(
                        items, adapter, layers, Path(tmp) / f"{name}_{t}_{r}", batch_size=bs, device="cpu",
                        threads=t, lengths=lengths, progress=False,
                    )
                    if r:
                        times[t].append(time.perf_counter() - start)
            base = statistics.median(times[args.threads[0]])
            for t in args.threads:
                med = statistics.median(times[t])
                print(
                    f"{name:5s} threads={t}: {len(items) / med:7.1f} items/s  (median {med:.2f} s, "
                    f"range {min(times[t]):.2f}-{max(times[t]):.2f} s)  time x{med / base:.2f} vs "
                    f"{args.threads[0]} thread(s)"
                )


if __name__ == "__main__":
    main()
