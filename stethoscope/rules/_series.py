"""Rolling per-name histories that survive a ``state_dict`` round trip, and robust trend statistics."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from stethoscope.trend import theil_sen as _theil_sen


def _round(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)  # full precision: a resumed run decides exactly as an unbroken one


def _unround(x: float | str) -> float:
    return float(x)


class Series:
    """Per-name windows of ``(step, value)`` pairs, newest last, at most ``maxlen`` each."""

    def __init__(self, maxlen: int):
        self.maxlen = max(1, int(maxlen))
        self._data: dict[str, deque[tuple[int, float]]] = {}

    def push(self, name: str, step: int | None, value: float) -> list[tuple[int, float]]:
        d = self._data.get(name)
        if d is None:
            d = self._data[name] = deque(maxlen=self.maxlen)
        d.append((int(step) if step is not None else (d[-1][0] + 1 if d else 0), float(value)))
        return list(d)

    def get(self, name: str) -> list[tuple[int, float]]:
        d = self._data.get(name)
        return list(d) if d is not None else []

    def values(self, name: str) -> list[float]:
        return [v for _, v in self._data.get(name, ())]

    def drop(self, name: str) -> None:
        self._data.pop(name, None)

    def names(self) -> Iterable[str]:
        return self._data.keys()

    def state_dict(self) -> dict:
        return {name: [[s, _round(v)] for s, v in d] for name, d in self._data.items()}

    def load_state_dict(self, state: dict) -> None:
        self._data = {}
        for name, pairs in (state or {}).items():
            d = self._data[name] = deque(maxlen=self.maxlen)
            for s, v in pairs:
                d.append((int(s), _unround(v)))


def mean(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else math.nan


def geomean(values: list[float]) -> float:
    vals = [v for v in values if v == v and v > 0]
    if not vals:
        return 0.0 if any(v == 0 for v in values) else math.nan
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def median(values: list[float]) -> float:
    vals = sorted(v for v in values if v == v)
    n = len(vals)
    if not n:
        return math.nan
    mid = n // 2
    return vals[mid] if n % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def theil_sen(points: list[tuple[int, float]]) -> float:
    """Median of pairwise slopes: a trend estimate one outlier cannot move (per step).

    ``points`` are ``(step, value)`` pairs; see :func:`stethoscope.trend.theil_sen`.
    """
    if len(points) < 2:
        return 0.0
    steps, values = zip(*points, strict=True)
    return _theil_sen(steps, values)


def kendall_tau(points: list[tuple[int, float]]) -> float:
    """Kendall's tau-a between step and value: +1 when every later value is higher."""
    n = len(points)
    if n < 2:
        return 0.0
    concordant = discordant = 0
    for i in range(n):
        for j in range(i + 1, n):
            ds = points[j][0] - points[i][0]
            dv = points[j][1] - points[i][1]
            prod = ds * dv
            if prod > 0:
                concordant += 1
            elif prod < 0:
                discordant += 1
    return (concordant - discordant) / (n * (n - 1) / 2)
