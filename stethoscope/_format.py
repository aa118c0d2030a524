"""How a float reads in a message or a table: ``0.123``, ``1.2e-05``, ``nan``, ``-inf``."""

from __future__ import annotations

import math


def format_float(x: float, digits: int) -> str:
    """``digits`` significant digits; scientific when |x| < 1e-3 or >= 1e5; NaN and ±Inf spelled out."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(1, digits - 1)}e}"
    return f"{x:.{digits}g}"
