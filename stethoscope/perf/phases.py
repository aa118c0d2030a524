"""Where one step's time goes, from host timestamps the extension takes at moments the monitor already sees.

Why host timestamps: a few ``time.perf_counter()`` calls per step cost well under a microsecond each and need
no synchronisation, so they can run on every step. On CUDA they measure when the host *issued* the work; the
device side comes from :mod:`stethoscope.perf.device`.

A step ``i`` is cut at these moments (all ``perf_counter`` seconds)::

    prev_end ─ data ─ entered ─ monitor ─ begun ─ data ─ fwd[0] … forward/backward … opt_start ─ optimizer ─
    opt_end ─ other ─ ending ─ monitor ─ ended

* ``prev_end``: the monitor finished with step ``i - 1``; ``entered``: ``begin_step(i)`` was called (its
  flush of step ``i - 1``'s record runs next); ``begun``: the monitor's step-begin work is done;
* ``forward``: the sum of the model's top-level forward calls (several with gradient accumulation);
* ``backward``: from the first forward call to the optimizer's step, less the forward calls (the loss, the
  backward passes, gradient clipping);
* ``optimizer``: the optimizer's ``step()``; ``other``: after it until the step's block ends (``zero_grad``,
  logging); ``monitor``: the monitor's own work at both boundaries;
* ``data``: the rest — from the end of the previous step to the first forward, less the monitor's part.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

PHASES = ("data", "forward", "backward", "optimizer", "other", "monitor")
COMPUTE = ("forward", "backward", "optimizer")  # what a sampled step's statistics slow down
STRAGGLER_PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class StepStamps:
    """The host moments of one step (see the module docstring); ``None`` for a moment that did not happen."""

    step: int
    sampled: bool = False
    prev_end: float | None = None
    entered: float | None = None
    begun: float = 0.0
    forward: list[tuple[float, float | None]] = field(default_factory=list)  # (start, end) per top-level call
    opt_start: float | None = None
    opt_end: float | None = None
    ending: float | None = None
    ended: float = 0.0
    carried: float = 0.0  # the monitor's own work after the previous step's end (counted as the monitor's)

    def phases(self) -> dict[str, float]:
        """Seconds per phase (:data:`PHASES`) and ``total``; every phase is ≥ 0 and they add up to ``total``.

        A phase the loop did not show (no optimizer, no forward seen) is 0 and its time lands in ``other``.
        """
        begun = self.begun
        entered = self.entered if self.entered is not None else begun
        ending = self.ending if self.ending is not None else self.ended
        end = self.ended
        start = self.prev_end if self.prev_end is not None else entered
        carried = min(max(0.0, self.carried), max(0.0, entered - start))
        monitor = max(0.0, begun - entered) + max(0.0, end - ending) + carried
        data = max(0.0, entered - start - carried)
        forward = backward = optimizer = 0.0
        calls = [(s, e) for s, e in self.forward if e is not None]
        if calls:
            first = calls[0][0]
            data += max(0.0, first - begun)
            forward = sum(max(0.0, e - s) for s, e in calls)
            until = self.opt_start if self.opt_start is not None and self.opt_start >= first else ending
            backward = max(0.0, until - first - forward)
            body_start = first
        else:
            body_start = begun
        if self.opt_start is not None and self.opt_end is not None and self.opt_end >= self.opt_start:
            optimizer = self.opt_end - self.opt_start
        total = max(0.0, end - start)
        used = data + forward + backward + optimizer + monitor
        other = max(0.0, total - used)
        if used > total:  # clock moments out of order (a stamp missed): trust the total, shrink the body
            body = max(0.0, ending - body_start)
            scale = body / max(forward + backward + optimizer, 1e-12)
            if scale < 1.0:
                forward, backward, optimizer = forward * scale, backward * scale, optimizer * scale
            other = max(0.0, total - (data + forward + backward + optimizer + monitor))
        return {"data": data, "forward": forward, "backward": backward, "optimizer": optimizer,
                "other": other, "monitor": monitor, "total": total}


class PhaseWindow:
    """The last ``size`` steps' phases, for the judgments (medians and trimmed shares over a window)."""

    def __init__(self, size: int):
        self.size = size
        self.steps: deque[int] = deque(maxlen=size)
        self.sampled: deque[bool] = deque(maxlen=size)
        self.rows: deque[dict[str, float]] = deque(maxlen=size)

    def add(self, step: int, sampled: bool, phases: dict[str, float]) -> None:
        self.steps.append(step)
        self.sampled.append(sampled)
        self.rows.append(phases)

    def __len__(self) -> int:
        return len(self.rows)

    def median(self, phase: str, only_unsampled: bool = False) -> float:
        vals = [r[phase] for r, s in zip(self.rows, self.sampled, strict=True) if not (only_unsampled and s)]
        return _median(vals)

    def medians(self, phases: Iterable[str] = STRAGGLER_PHASES) -> dict[str, float]:
        return {p: self.median(p) for p in phases}

    def share(self, phase: str, trim: float = 5.0) -> float:
        """``phase``'s share of the wall clock over the window, leaving out steps longer than ``trim`` times
        the median step (an evaluation or a checkpoint between two steps is not a data wait)."""
        rows = list(self.rows)
        if not rows:
            return math.nan
        cap = trim * _median([r["total"] for r in rows])
        kept = [r for r in rows if r["total"] <= cap] or rows
        total = sum(r["total"] for r in kept)
        return sum(r[phase] for r in kept) / total if total > 0 else math.nan


def sampled_excess(phases: dict[str, float], baseline: float) -> float:
    """Seconds a sampled step's forward + backward + optimizer took beyond the unsampled steps' median:
    the statistics' hook work, which happens inside those phases."""
    if not math.isfinite(baseline):
        return 0.0
    return max(0.0, sum(phases[p] for p in COMPUTE) - baseline)


def _median(vals: list[float]) -> float:
    vals = sorted(v for v in vals if v == v)
    n = len(vals)
    if n == 0:
        return math.nan
    mid = n // 2
    return vals[mid] if n % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def median(vals: Iterable[float]) -> float:
    """The median of the finite values (NaN when there are none)."""
    return _median(list(vals))
