"""The flight recorder's memory: two bounded ring buffers of plain tuples.

``events`` holds everything readable — logging records, step boundaries, statistics summaries, findings,
memory readings — as ``(time, step, kind, level, source, text)`` with ``text`` cut to ``max_entry_chars``.
``modules`` holds module enter/exit events ``(perf_counter, step, name, entered)`` in a ring of its own, so a
step with hundreds of module calls cannot push the log records of the steps before it out of ``events``.

Both are ``collections.deque(maxlen=...)``: appending is O(1) and the oldest entry falls out. Nothing keeps
a reference to a tensor or to the logging record's arguments (the message is formatted when captured), so
the memory held is bounded by :meth:`FlightRecorder.bound_bytes`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import sys
import time
import traceback
from collections import deque

# Bytes one event costs besides one byte per character of its text: the 6-tuple (88), the time float (24),
# the step and level ints (28 each), the text's str header (49); the kind and source strings are shared. Text
# outside Latin-1 takes 2 or 4 bytes per character. Checked with sys.getsizeof in tests/recorder.
EVENT_OVERHEAD = 256
# One module event: a 4-tuple (72), a float (24), an int (28), a bool; the name string is the module's own.
MODULE_EVENT_BYTES = 128

DEBUG = logging.DEBUG


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (a marker says how much was left out)."""
    if len(text) <= limit:
        return text
    marker = f" ...[+{len(text) - limit + 24} chars]"
    return text[: max(0, limit - len(marker))] + marker


def cut_tail(text: str, limit: int) -> str:
    """``text`` cut to its last ``limit`` characters (a traceback's end is where the error is)."""
    if len(text) <= limit:
        return text
    marker = f"[...{len(text) - limit + 16} chars] "
    return marker + text[len(text) - max(0, limit - len(marker)) :]


class FlightRecorder:
    """Bounded in-memory event log.

    Args:
        capacity: events kept in ``events``.
        max_entry_chars: the longest text kept for one event.
        module_capacity: module enter/exit events kept (0: none).
    """

    def __init__(self, capacity: int = 4096, max_entry_chars: int = 1000, module_capacity: int = 2048):
        self.capacity = int(capacity)
        self.max_entry_chars = int(max_entry_chars)
        self.module_capacity = int(module_capacity)
        self.events: deque = deque(maxlen=self.capacity)
        self.modules: deque = deque(maxlen=max(1, self.module_capacity))
        self.step: int | None = None
        self.dropped = 0  # events that fell out of the ring (counted when the ring is full)

    def bound_bytes(self) -> int:
        """The most memory the two rings hold with single-byte text: ``capacity × (max_entry_chars + 256)``
        plus ``module_capacity × 128`` bytes (4.9 MiB + 0.25 MiB at the defaults)."""
        return self.capacity * (self.max_entry_chars + EVENT_OVERHEAD) + self.module_capacity * MODULE_EVENT_BYTES

    def add(self, kind: str, source: str, text: str, level: int = DEBUG) -> None:
        events = self.events
        if len(events) == self.capacity:
            self.dropped += 1
        if len(text) > self.max_entry_chars:
            text = cut(text, self.max_entry_chars)
        events.append((time.time(), self.step, kind, level, source, text))

    def add_log(self, record: logging.LogRecord) -> None:
        """A logging record, formatted now (its arguments are not kept)."""
        try:
            text = record.getMessage()
        except Exception:  # a bad format string in someone's log call
            text = f"{record.msg!r} % {record.args!r}"
        if record.exc_info and record.exc_info[1] is not None:
            try:
                exc_text = "".join(traceback.format_exception(*record.exc_info))
            except Exception:
                exc_text = repr(record.exc_info[1])
            text = cut(text, self.max_entry_chars // 3)
            text = text + "\n" + cut_tail(exc_text, self.max_entry_chars - len(text) - 1)
        elif record.stack_info:
            text = text + "\n" + str(record.stack_info)
        self.add("log", record.name, text, record.levelno)

    def module(self, name: str, entered: bool) -> None:
        self.modules.append((time.perf_counter(), self.step, name, entered))

    # ------------------------------------------------------------------ reading back
    def rows(self) -> list[dict]:
        """Every event, oldest first, as dicts (the ``crash-*.jsonl`` lines)."""
        out = []
        for t, step, kind, level, source, text in list(self.events):
            out.append(
                {
                    "time": t,
                    "step": step,
                    "kind": kind,
                    "level": logging.getLevelName(level),
                    "source": source,
                    "message": text,
                }
            )
        return out

    def lines(self) -> list[str]:
        """Every event, oldest first, as text lines (multi-line messages indented)."""
        out = []
        for t, step, kind, level, source, text in list(self.events):
            stamp = _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]
            head = f"{stamp} {logging.getLevelName(level):<8s} step {'-' if step is None else step:<6} "
            head += f"{kind:<8s} {source}: "
            parts = text.split("\n")
            out.append(head + parts[0])
            out.extend("    " + p for p in parts[1:])
        return out

    def open_modules(self, step: int | None) -> list[str]:
        """Modules entered and not exited during ``step`` (outermost first): where an exception struck."""
        stack: list[str] = []
        for _, s, name, entered in list(self.modules):
            if s != step:
                continue
            if entered:
                stack.append(name)
            elif stack and stack[-1] == name:
                stack.pop()
            elif name in stack:
                del stack[stack.index(name) :]
        return stack

    def module_lines(self, limit: int = 60) -> list[str]:
        events = list(self.modules)[-limit:]
        if not events:
            return []
        t0 = events[0][0]
        return [
            f"  +{(t - t0) * 1e3:9.2f} ms  step {s}  {'enter' if entered else 'exit '}  {name or '<model>'}"
            for t, s, name, entered in events
        ]


def sizeof_event(event: tuple) -> int:
    """Bytes one stored event holds beyond what it shares (the tuple, its time, step, level and text)."""
    t, step, _kind, level, _source, text = event
    return sum(sys.getsizeof(x) for x in (event, t, step, level, text))
