"""The CUDA path of logged scalars on unsampled steps, with the CUDA parts faked (no GPU in CI).

What is checked is the monitor's own logic: an unsampled step whose logged scalars live on a CUDA device
is queued instead of waited for, records are processed once their copy has completed, and a sampled
step or close() first waits for everything queued, so the metrics stay in step order.
"""

from __future__ import annotations

import torch

import stethoscope as st
from stethoscope import collector as collector_mod

from ._helpers import quiet_config, rows


class FakeEvent:
    """Completes after ``delay`` polls, like a copy still in flight on the stream."""

    def __init__(self, delay: int):
        self.polls = delay

    def query(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def synchronize(self) -> None:
        self.polls = -1


class CudaLooking(torch.Tensor):
    """A CPU tensor that reports a CUDA device, to route mon.log() through the async path."""

    @property
    def device(self):  # type: ignore[override]
        return torch.device("cuda", 0)


def test_unsampled_cuda_scalars_are_queued_and_written_in_order(tiny_mlp, run_dir, monkeypatch):
    events: list[FakeEvent] = []

    def fake_event(device):
        events.append(FakeEvent(delay=1))
        return events[-1]

    monkeypatch.setattr(collector_mod.AsyncScalars, "_host_buffer", staticmethod(
        lambda n: torch.empty(n, dtype=torch.float32)))
    monkeypatch.setattr(collector_mod.AsyncScalars, "_event", staticmethod(fake_event))
    real_submit = collector_mod.AsyncScalars.submit

    def submit(self, step, pending, names, tensors, values):  # the fake device ends here
        return real_submit(self, step, pending, names, [t.as_subclass(torch.Tensor) for t in tensors], values)

    monkeypatch.setattr(collector_mod.AsyncScalars, "submit", submit)
    path = run_dir()
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config(),
                     schedule=lambda s: s in (0, 5))
    x = torch.randn(16, 8)
    for step in range(8):
        with mon.step(step):
            loss = tiny_mlp(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mon.log(loss=torch.tensor(float(step)).as_subclass(CudaLooking))
        if step == 3:
            # unsampled steps 1..3 were queued, not waited for: a copy is still in flight, its loss unwritten
            assert events and events[-1].polls >= 0
            mon.flush()  # the queue is polled, not drained: step 3's copy is still in flight
            assert 3 not in set(rows(path, "scalar")["step"])
    mon.close()
    assert not [f for f in st.load_run(path).findings if f.code == "monitor.error"]
    assert len(events) >= 5  # steps 1-4 and 6 went through the queue (step 7 is flushed by close)
    losses = rows(path, "scalar")
    losses = losses[losses["name"] == "loss"]
    assert list(losses["step"]) == list(range(8))  # every step, in order
    assert list(losses["value"]) == [float(s) for s in range(8)]
