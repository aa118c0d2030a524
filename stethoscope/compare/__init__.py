"""Where two models, or two runs, part ways: ``st.compare`` and ``stethoscope compare`` (docs/compare.md).

* :func:`compare` — two models on the same inputs: the first module whose output differs beyond a
  dtype-aware tolerance, the module where the difference is born, and every layer's error.
* :func:`compare_runs` — two run directories: ``meta.json`` differences, the loss curves, and the first step
  and module whose recorded statistics part ways beyond their noise.

The package itself is callable, so ``st.compare(model_a, model_b, inputs)`` is :func:`compare` (a plain
function at ``st.compare`` would be shadowed by this package as soon as one of its modules is imported).
"""

import sys
import types
from typing import Any

from stethoscope.compare.models import compare, default_loss
from stethoscope.compare.result import Comparison, GradDiff, ModuleDiff
from stethoscope.compare.runs import RunComparison, compare_runs

__all__ = ["Comparison", "GradDiff", "ModuleDiff", "RunComparison", "compare", "compare_runs", "default_loss"]


class _CallableModule(types.ModuleType):
    """``st.compare(...)`` calls :func:`compare`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Comparison:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
