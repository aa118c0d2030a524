"""Attention statistics ride on the monitor's one host transfer per sampled step: no sync of their own."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

import stethoscope as st
import stethoscope.stats as stats_mod

from .conftest import QUIET, bert, padded_batch

PKG = str(Path(st.__file__).parent)
SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")


def test_attention_capture_adds_no_host_sync(tmp_path, monkeypatch):
    # the statistics engine reads sums back for CPU tensors only (host memory, nothing to wait for); count
    # the road accelerators take, which must not read anything back
    monkeypatch.setattr(stats_mod, "reads_host", lambda device: False)
    counts: collections.Counter = collections.Counter()
    on = {"v": False}

    def ours() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.startswith(PKG):
                return True
            frame = frame.f_back
        return False

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if on["v"] and ours():
                counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    model = bert()
    ids, mask = padded_batch()
    mon = st.Monitor(model, run_dir=tmp_path / "r", config=QUIET)
    with mon.step(0):  # first-call paths outside the count
        model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    mon.flush()
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    on["v"] = True
    with mon.step(1):
        model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert counts == {}, counts  # the capture and the statistics: device work only
    mon.flush()
    on["v"] = False
    assert counts["cpu"] == 1 and counts["numpy"] == 1, counts  # the step's single transfer
    assert all(counts[n] == 0 for n in ("item", "tolist", "__float__", "__int__", "__bool__")), counts
    mon.close()
    assert len(st.load_run(tmp_path / "r").metrics_of("attn")) == 2 * 2 * 2
