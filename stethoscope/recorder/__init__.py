"""The crash flight recorder: DEBUG-level events kept in bounded memory, written only when the run crashes.

See ``docs/recorder.md``. The monitor builds it through :mod:`stethoscope.recorder.extension`; the pieces:
:class:`~stethoscope.recorder.buffer.FlightRecorder` (the rings), :class:`~stethoscope.recorder.logcapture.LogCapture`
(logging at DEBUG without changing any output) and :func:`~stethoscope.recorder.dump.read_crash`.
"""

from __future__ import annotations

from stethoscope.recorder.buffer import FlightRecorder
from stethoscope.recorder.dump import read_crash, write_crash
from stethoscope.recorder.logcapture import LogCapture

__all__ = ["FlightRecorder", "LogCapture", "read_crash", "write_crash"]
