"""Capture ``logging`` records at DEBUG for the flight recorder while every output stays where it was.

Two parts, both undone by :meth:`LogCapture.uninstall`:

* levels: the root logger (and the loggers named in ``recorder.levels``) are set to the capture level, so
  ``logger.debug(...)`` calls create records at all;
* a log-record factory (``logging.setLogRecordFactory``, chained to the one before) hands every record to
  the recorder as it is created. A record that exists only because the level was lowered — below the level
  its logger had before — is marked quiet, and every handler it would reach gets a filter that drops quiet
  records. Consoles and log files therefore print exactly what they printed before: nothing at DEBUG is
  written anywhere until a crash writes the recorder's dump.

Why a record factory and not a handler on the root logger: a handler there would turn a later
``logging.basicConfig()`` into a no-op (it does nothing when the root already has a handler), silently
losing the program's own console output. The factory sees every record, including those of loggers that do
not propagate to the root (``transformers`` does not).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable

_QUIET = "_stethoscope_quiet"
# Loggers whose level a live capture lowered: name -> [captures holding it, level before, level set]. Shared
# by every capture in the process, so two monitors alive at once restore the levels only when both are done.
_LOWERED: dict[str, list[int]] = {}
_LOCK = threading.Lock()


class _QuietFilter(logging.Filter):
    """Drops the records the capture created below their logger's previous level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _QUIET, False)


def _level(value: str | int) -> int:
    if isinstance(value, int):
        return value
    return int(logging.getLevelName(str(value).upper()))


def _logger(name: str) -> logging.Logger:
    return logging.getLogger() if name in ("", "root") else logging.getLogger(name)


class LogCapture:
    """Routes records at ``level`` (and per-logger ``levels``) to ``sink`` without changing any output.

    Args:
        sink: called with each record created (must not raise; errors are swallowed).
        level: the capture level of the root logger (loggers without a level of their own inherit it).
        levels: logger name -> capture level (``""`` or ``"root"`` is the root).
    """

    def __init__(self, sink: Callable[[logging.LogRecord], None], level: str | int = "DEBUG",
                 levels: dict[str, str | int] | None = None):
        self._sink = sink
        self._level = _level(level)
        self._levels = {("" if k == "root" else k): _level(v) for k, v in (levels or {}).items()}
        self._names: list[str] = []  # the loggers whose level this capture holds lowered
        self._prev_factory: Callable | None = None
        self._factory_fn: Callable | None = None
        self._filter = _QuietFilter()
        self._guarded: dict[int, weakref.ref] = {}  # handlers given the quiet filter
        self.active = False

    # ------------------------------------------------------------------ install / uninstall
    def install(self) -> LogCapture:
        if self.active:
            return self
        with _LOCK:
            for name, level in self._wanted().items():
                self._hold(name, level)
        self._prev_factory = logging.getLogRecordFactory()
        prev = self._prev_factory
        ref = weakref.ref(self)

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = prev(*args, **kwargs)
            cap = ref()
            if cap is not None and cap.active:
                cap._take(record)
            return record

        self._factory_fn = factory
        logging.setLogRecordFactory(factory)
        self.active = True
        return self

    def _wanted(self) -> dict[str, int]:
        return {"": self._level, **self._levels}

    def _hold(self, name: str, level: int) -> None:
        """Lower ``name``'s logger to ``level`` (shared with other live captures); call under ``_LOCK``."""
        lg = _logger(name)
        entry = _LOWERED.get(name)
        if entry is not None:
            if name not in self._names:  # another live capture set it already: share it
                entry[0] += 1
                self._names.append(name)
            if lg.level != entry[2]:  # the program set its own level since (e.g. basicConfig(level=INFO)):
                entry[1] = lg.level  # that is now what its outputs should show
                if name != "" or lg.level > level:
                    lg.setLevel(entry[2])
            return
        old = lg.level
        # The root only ever goes down (a root at DEBUG, or NOTSET, already lets every record be created); a
        # named logger gets exactly what the config asks.
        if name == "" and (old == logging.NOTSET or old <= level):
            return
        _LOWERED[name] = [1, old, level]
        self._names.append(name)
        lg.setLevel(level)

    def refresh(self) -> None:
        """Re-apply the capture levels if the program changed them since (called at every step start)."""
        if not self.active:
            return
        for name, level in self._wanted().items():
            entry = _LOWERED.get(name)
            if entry is not None and _logger(name).level == entry[2]:
                continue
            with _LOCK:
                self._hold(name, level)

    def uninstall(self) -> None:
        if not self.active:
            return
        self.active = False
        if logging.getLogRecordFactory() is self._factory_fn and self._prev_factory is not None:
            logging.setLogRecordFactory(self._prev_factory)
        # (if someone wrapped our factory since, it stays in their chain as a pass-through)
        with _LOCK:
            for name in self._names:
                entry = _LOWERED.get(name)
                if entry is None:
                    continue
                entry[0] -= 1
                if entry[0] <= 0:
                    del _LOWERED[name]
                    lg = _logger(name)
                    if lg.level == entry[2]:  # the program did not change it since
                        lg.setLevel(entry[1])
            self._names.clear()
        for ref in list(self._guarded.values()):
            handler = ref()
            if handler is not None:
                with contextlib.suppress(ValueError):
                    handler.removeFilter(self._filter)
        self._guarded.clear()

    # ------------------------------------------------------------------ per record
    def _take(self, record: logging.LogRecord) -> None:
        try:
            self._sink(record)
            if record.levelno < self._floor(record.name):
                setattr(record, _QUIET, True)
                self._guard_handlers(record.name)
        except Exception:  # the program's logging must never fail because of us
            pass

    def _floor(self, name: str) -> int:
        """The level the record's logger had before the capture (its effective level then)."""
        lg: logging.Logger | None = _logger(name)
        root = logging.getLogger()
        while lg is not None:
            entry = _LOWERED.get("" if lg is root else lg.name)
            level = entry[1] if entry is not None and lg.level == entry[2] else lg.level
            if level:
                return level
            lg = lg.parent
        return logging.NOTSET

    def _guard_handlers(self, name: str) -> None:
        lg: logging.Logger | None = _logger(name)
        while lg is not None:
            for handler in lg.handlers:
                if id(handler) not in self._guarded or self._guarded[id(handler)]() is not handler:
                    handler.addFilter(self._filter)
                    self._guarded[id(handler)] = weakref.ref(handler)
            if not lg.propagate:
                break
            lg = lg.parent
        last = logging.lastResort  # used when no handler is found; it prints WARNING and above only
        if last is not None and id(last) not in self._guarded:
            last.addFilter(self._filter)
            self._guarded[id(last)] = weakref.ref(last)
