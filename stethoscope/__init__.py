"""stethoscope: diagnostics for PyTorch and Hugging Face transformer training and model internals.

    import stethoscope as st
    mon = st.Monitor(model, optimizer=opt, run_dir="runs/exp1")
    ...
    run = st.load_run("runs/exp1")

The public names are imported on first use, so ``stethoscope --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "stethoscope.config",
    "load_config": "stethoscope.config",
    "ConfigError": "stethoscope.errors",
    "CriticalFindingError": "stethoscope.errors",
    "MonitorClosedError": "stethoscope.errors",
    "MonitorUsageError": "stethoscope.errors",
    "RunDirError": "stethoscope.errors",
    "StethoscopeError": "stethoscope.errors",
    "PreflightError": "stethoscope.errors",
    "Monitor": "stethoscope.monitor",
    "Trace": "stethoscope.trace",
    "HangError": "stethoscope.watchdog",
    "Run": "stethoscope.run",
    "RunDirWarning": "stethoscope.run",
    "load_run": "stethoscope.run",
    "preflight": "stethoscope.checks",
}

__all__ = [
    "Config",
    "ConfigError",
    "CriticalFindingError",
    "HangError",
    "Monitor",
    "MonitorClosedError",
    "MonitorUsageError",
    "PreflightError",
    "Run",
    "RunDirError",
    "RunDirWarning",
    "StethoscopeError",
    "Trace",
    "__version__",
    "compare",
    "load_config",
    "load_run",
    "preflight",
]

if TYPE_CHECKING:
    from stethoscope.checks import preflight
    from stethoscope.compare import compare
    from stethoscope.config import Config, load_config
    from stethoscope.errors import (
        ConfigError,
        CriticalFindingError,
        MonitorClosedError,
        MonitorUsageError,
        PreflightError,
        RunDirError,
        StethoscopeError,
    )
    from stethoscope.monitor import Monitor
    from stethoscope.run import Run, RunDirWarning, load_run
    from stethoscope.trace import Trace
    from stethoscope.watchdog import HangError


# Sub-packages reachable as attributes (``st.attention.step_by_step(...)``), imported on first use.
# ``st.compare`` is its package, made callable (``st.compare(a, b, inputs)``): importing a submodule such as
# ``stethoscope.compare.runs`` binds the package to that attribute, so a function there would be shadowed.
_SUBPACKAGES = ("attention", "compare")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"stethoscope.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stethoscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
