"""stethoscope: diagnostics for PyTorch and Hugging Face transformer training and model internals.

    import stethoscope as st
    mon = st.Monitor(model, optimizer=opt, run_dir="runs/exp1")
    ...
    run = st.load_run("runs/exp1")
"""

from __future__ import annotations

__version__ = "0.1.0"

from stethoscope.config import Config, load_config
from stethoscope.errors import (
    ConfigError,
    CriticalFindingError,
    MonitorClosedError,
    MonitorUsageError,
    RunDirError,
    StethoscopeError,
)
from stethoscope.monitor import Monitor
from stethoscope.run import Run, load_run

__all__ = [
    "Config",
    "ConfigError",
    "CriticalFindingError",
    "Monitor",
    "MonitorClosedError",
    "MonitorUsageError",
    "Run",
    "RunDirError",
    "StethoscopeError",
    "__version__",
    "load_config",
    "load_run",
]
