"""The heartbeat: where the run is right now, stamped by every hook on every step (sampled or not).

Hooks do a couple of list and attribute writes here and nothing else on unsampled steps; the watchdog
thread only reads it. Reads from another thread are racy by design (a torn read costs one stale sample,
never a crash): the stack is copied before use.
"""

from __future__ import annotations

import time


class Heartbeat:
    """Current step, module call stack (outermost first), and the time of the last stamp."""

    __slots__ = ("completed", "in_step", "paused", "phase", "stack", "stamp", "step", "step_started")

    def __init__(self) -> None:
        self.step: int | None = None
        self.in_step = False
        self.paused = False
        self.stack: list[str] = []  # module names, outermost first
        self.stamp = time.monotonic()
        self.step_started = self.stamp
        self.completed: set[str] = set()  # modules that have finished at least one call
        self.phase: str | None = None  # data / forward / backward / optimizer / other, set by stethoscope.perf

    def enter(self, name: str) -> None:
        self.stack.append(name)
        self.stamp = time.monotonic()

    def exit(self, name: str) -> None:
        stack = self.stack
        if stack and stack[-1] == name:
            stack.pop()
        elif name in stack:  # an exception skipped inner exits: unwind to this module
            del stack[stack.index(name) :]
        self.completed.add(name)
        self.stamp = time.monotonic()

    def snapshot(self) -> dict:
        """A consistent copy for another thread to read."""
        return {
            "step": self.step,
            "in_step": self.in_step,
            "paused": self.paused,
            "stack": list(self.stack),
            "stamp": self.stamp,
            "step_started": self.step_started,
            "phase": self.phase,
        }
