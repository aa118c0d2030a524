"""At most one device-to-host transfer per flushed step, and no per-tensor sync (issue 2, item 4).

Every Tensor method that reads a value back to the host is wrapped with a counter. A call counts against
stethoscope when a stethoscope frame is on the Python stack (its own code, or torch code it called); the
training code's own syncs (none here) and the optimizer's would not. ``.to(cpu)`` counts only when the
tensor is not already on the CPU (a real copy); on this CPU-only machine that path is checked by ``cpu``.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch

import stethoscope as st
import stethoscope.monitor as monitor_mod
import stethoscope.stats as stats_mod

from ._helpers import batch, quiet_config

PKG = str(Path(st.__file__).parent)
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu", "to")


def _from_stethoscope() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PKG):
            return True
        frame = frame.f_back
    return False


def _is_host_copy(t: torch.Tensor, args, kwargs) -> bool:
    targets = [a for a in (*args, *kwargs.values()) if isinstance(a, str | torch.device)]
    return any(torch.device(d).type == "cpu" for d in targets) and t.device.type != "cpu"


@pytest.fixture
def sync_counter(monkeypatch):
    """``counts[(method, by_stethoscope)]``; call ``start()`` to begin counting.

    The statistics engine reads chunk sums back for CPU tensors (host memory: no transfer, nothing to wait
    for; see stethoscope.stats). The counted runs take the road every accelerator takes, which reads nothing.
    """
    monkeypatch.setattr(stats_mod, "reads_host", lambda device: False)
    counts: collections.Counter = collections.Counter()
    state = {"on": False}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if state["on"] and (name != "to" or _is_host_copy(self, args, kwargs)):
                counts[(name, _from_stethoscope())] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    counts.start = lambda: state.__setitem__("on", True)  # type: ignore[attr-defined]
    counts.stop = lambda: state.__setitem__("on", False)  # type: ignore[attr-defined]
    return counts


def _per_flush(monkeypatch, counts) -> list[dict]:
    """Snapshot the counts around every flush so each flush is checked on its own.

    A finished step's record is flushed when the next step begins and at ``close()``: both are wrapped (the
    first ``begin_step`` of a counted range flushes the step before it)."""
    per: list[dict] = []

    def counted(original):
        def call(self, *args, **kwargs):
            before = collections.Counter(counts)
            try:
                return original(self, *args, **kwargs)
            finally:
                per.append({k: v - before.get(k, 0) for k, v in counts.items() if v - before.get(k, 0)})

        return call

    for method in ("begin_step", "close"):
        monkeypatch.setattr(monitor_mod.Monitor, method, counted(getattr(monitor_mod.Monitor, method)))
    return per


def _loop(mon, model, opt, steps, scaler=None):
    for step in steps:
        x, y = batch(step)
        with mon.step(step):
            loss = (model(x) - y).pow(2).mean()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=loss.detach(), lr=0.01)


def test_one_transfer_per_sampled_step(tiny_mlp, run_dir, sync_counter, monkeypatch):
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01, momentum=0.9)  # SGD: no syncs of its own
    mon = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), config=quiet_config())
    _loop(mon, tiny_mlp, opt, range(2))  # warm up outside the count (first-call paths)
    per = _per_flush(monkeypatch, sync_counter)
    sync_counter.start()
    _loop(mon, tiny_mlp, opt, range(2, 5))
    mon.close()
    sync_counter.stop()
    assert len(per) == 4  # the flushes of steps 1, 2, 3 (entering 2, 3, 4) and of step 4 (close)
    for counts in per:
        ours = {k: v for (k, by_us), v in counts.items() if by_us}
        assert ours.get("cpu", 0) <= 1 and ours.get("numpy", 0) <= 1, ours
        assert ours.get("cpu", 0) == 1, "a sampled step's rows must come back (once)"
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "to"):
            assert ours.get(name, 0) == 0, (name, ours)
    # nothing at all happened in the hooks and the step protocol outside the flushes
    total = collections.Counter()
    for counts in per:
        total.update(counts)
    outside = {k: v - total.get(k, 0) for k, v in sync_counter.items() if k[1] and v - total.get(k, 0)}
    assert outside == {}
    run = st.load_run(mon.run_dir)
    assert {"act", "grad", "update", "input", "scalar"} <= set(run.metrics["kind"])


def test_one_transfer_with_adam_gpt2_and_a_grad_scaler(tiny_gpt2, run_dir, sync_counter, monkeypatch):
    model = tiny_gpt2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    mon = st.Monitor(model, opt, run_dir=run_dir(), config=quiet_config(), scaler=scaler)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))

    def one(step):
        with mon.step(step):
            loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            mon.after_backward()  # read before the scaler unscales: still one transfer
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        mon.log(loss=loss.detach())

    one(0)
    per = _per_flush(monkeypatch, sync_counter)
    sync_counter.start()
    one(1)
    mon.close()
    sync_counter.stop()
    assert len(per) == 2
    for counts in per:
        ours = {k: v for (k, by_us), v in counts.items() if by_us}
        assert ours.get("cpu", 0) <= 1 and ours.get("numpy", 0) <= 1, ours
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "to"):
            assert ours.get(name, 0) == 0, (name, ours)
    theirs = {k: v for (k, by_us), v in sync_counter.items() if not by_us}
    assert theirs, "the counter should see the optimizer's and the scaler's own syncs (sanity check)"


def test_unsampled_steps_do_no_transfer_at_all(tiny_mlp, run_dir, sync_counter):
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    mon = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), schedule=lambda step: step == 0)
    _loop(mon, tiny_mlp, opt, range(1))  # step 0 sampled, flushed when step 1 starts
    for step in range(1, 6):  # unsampled, nothing logged: not even the flush has anything to fetch
        if step == 2:
            sync_counter.start()
        x, y = batch(step)
        with mon.step(step):
            (tiny_mlp(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    sync_counter.stop()
    mon.close()
    assert {k: v for k, v in sync_counter.items() if k[1]} == {}
