"""How a number reads in a message, a table or a report: the one place that spells numbers out.

``format_float`` (``0.123``, ``1.2e-05``, ``nan``, ``-inf``) for messages; ``format_value`` for a table cell
of any type (``None`` as a dash, ints as ints); ``format_fixed`` for a fixed number of decimals (``0.81``,
``n/a``); ``format_percent`` for a fraction as a percentage (``12.5 %``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def format_float(x: float, digits: int) -> str:
    """``digits`` significant digits; scientific when |x| < 1e-3 or >= 1e5; NaN and ±Inf spelled out."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(1, digits - 1)}e}"
    return f"{x:.{digits}g}"


def format_value(value: Any, digits: int = 4, none: str = "—") -> str:
    """Any value as a table cell: ``none`` for None, bools and ints as they are, floats by
    :func:`format_float` with ``digits`` significant digits, anything else as ``str``."""
    if value is None:
        return none
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return format_float(float(value), digits)
    return str(value)


def format_fixed(x: Any, digits: int = 3, missing: str = "n/a") -> str:
    """``digits`` decimals (``0.812``); ``missing`` for None and NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return f"{x:.{digits}f}"


def format_percent(value: Any, missing: str = "—") -> str:
    """A fraction in [0, 1] as a percentage with one decimal (``12.5 %``); ``missing`` for NaN or a
    value that is not a number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return missing
    return missing if math.isnan(v) else f"{100 * v:.1f} %"
