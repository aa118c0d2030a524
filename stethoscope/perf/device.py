"""Device-side phase times from CUDA events, read back lazily: never a synchronisation.

Why: on CUDA the host returns from ``forward()`` long before the kernels finish, so host timestamps say when
work was issued, not how long the GPU spent on it. An event recorded on the current stream at each phase
moment marks the same moment on the device's timeline. An event is only read once ``query()`` says it has
completed (a non-blocking check), typically a step later; until then the step waits in a short queue, and a
queue that grows past ``max_pending`` steps (a stream that never drains) drops its oldest step untimed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch


def cuda_events_available(device: torch.device | None) -> bool:
    """True when ``device`` is a CUDA device and CUDA can be used here (no event is created otherwise)."""
    return device is not None and device.type == "cuda" and torch.cuda.is_available()


def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


class DeviceTimer:
    """Events per step at the phase moments; :meth:`poll` returns the steps whose events have completed.

    Args:
        make_event: builds an event with ``record()``, ``query()`` and ``elapsed_time(other)`` (ms) — a CUDA
            event by default (tests pass a fake one).
        max_pending: steps kept waiting for their events at most.
    """

    def __init__(self, make_event: Callable[[], Any] = _cuda_event, max_pending: int = 8, pool: int = 64):
        self.make_event = make_event
        self.max_pending = max_pending
        self._free: list[Any] = []
        self._pool = pool
        self._marks: list[tuple[str, Any]] = []
        self._pending: deque[tuple[int, list[tuple[str, Any]]]] = deque()
        self.dropped = 0

    def mark(self, label: str) -> None:
        """Record an event for ``label`` (``begin``, ``fwd_start``, ``fwd_end``, ``opt_start``, ``opt_end``,
        ``end``) on the current stream."""
        ev = self._free.pop() if self._free else self.make_event()
        ev.record()
        self._marks.append((label, ev))

    def end_step(self, step: int) -> None:
        if self._marks:
            self._pending.append((step, self._marks))
            self._marks = []
        while len(self._pending) > self.max_pending:
            self._recycle(self._pending.popleft()[1])
            self.dropped += 1

    def discard_open(self) -> None:
        """Forget the marks of a step that did not end normally."""
        self._recycle(self._marks)
        self._marks = []

    def poll(self) -> list[tuple[int, dict[str, float]]]:
        """``(step, device seconds per phase)`` for every pending step whose last event has completed, oldest
        first; stops at the first step still running (streams complete in order)."""
        out = []
        while self._pending:
            step, marks = self._pending[0]
            if not marks[-1][1].query():
                break
            self._pending.popleft()
            out.append((step, device_phases(marks)))
            self._recycle(marks)
        return out

    def _recycle(self, marks: list[tuple[str, Any]]) -> None:
        for _, ev in marks:
            if len(self._free) < self._pool:
                self._free.append(ev)


def device_phases(marks: list[tuple[str, Any]]) -> dict[str, float]:
    """Device seconds of ``forward`` (top-level calls summed), ``backward`` (first forward to the optimizer,
    less forward), ``optimizer`` and ``step`` (begin to end) from one step's labelled, completed events."""

    def ms(a: Any, b: Any) -> float:
        return max(0.0, float(a.elapsed_time(b)))

    first = {label: ev for label, ev in reversed(marks)}
    out: dict[str, float] = {}
    starts = [ev for label, ev in marks if label == "fwd_start"]
    ends = [ev for label, ev in marks if label == "fwd_end"]
    if starts and ends:
        forward = sum(ms(s, e) for s, e in zip(starts, ends, strict=False))
        out["device_forward"] = forward / 1000.0
        until = first.get("opt_start") or first.get("end")
        if until is not None:
            out["device_backward"] = max(0.0, ms(starts[0], until) - forward) / 1000.0
    if "opt_start" in first and "opt_end" in first:
        out["device_optimizer"] = ms(first["opt_start"], first["opt_end"]) / 1000.0
    if "begin" in first and "end" in first:
        out["device_step"] = ms(first["begin"], first["end"]) / 1000.0
    return out
