"""Typed errors of the probing pipeline; each message names the bad input and the fix."""

from __future__ import annotations

from stethoscope.errors import StethoscopeError


class ProbeDataError(StethoscopeError, ValueError):
    """The dataset cannot be probed: missing files, unknown columns, too few groups, unreadable audio."""


class ProbeLayerError(StethoscopeError, KeyError):
    """A requested layer (alias or module name) does not exist in the model."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ProbeStageError(StethoscopeError, RuntimeError):
    """A stage needs what an earlier stage writes (features before fit, metrics before report)."""


class ProbeModelError(StethoscopeError, RuntimeError):
    """A model or adapter could not be built or produced no usable hidden states."""
