"""Writing a crash dump: ``crash-<time>.txt`` for people and ``crash-<time>.jsonl`` for programs.

The text file follows the hang dump's layout (``hang-*.txt``): a header (reason, time, pid, step), the
exception and its traceback, any sections the caller adds (the out-of-memory context), where the model was
(modules entered and not left), device memory, the recorder's events oldest first, and, for a signal, the
Python stacks of every thread. The JSON-lines file holds a header line (``kind: "crash"``) and then one line
per event, so the DEBUG history can be filtered with ``jq`` or pandas.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import traceback
from pathlib import Path
from typing import Any

from stethoscope.rundir import SCHEMA_VERSION, dumps


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]


def crash_paths(run_dir: Path) -> tuple[Path, Path]:
    """Fresh ``crash-<time>[-n].txt`` / ``.jsonl`` paths in ``run_dir``."""
    stamp = _stamp()
    base = run_dir / f"crash-{stamp}"
    n = 1
    while base.with_suffix(".txt").exists() or base.with_suffix(".jsonl").exists():
        n += 1
        base = run_dir / f"crash-{stamp}-{n}"
    return base.with_suffix(".txt"), base.with_suffix(".jsonl")


def exception_text(exc: BaseException | None) -> list[str]:
    if exc is None:
        return []
    try:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    except Exception:
        lines = [repr(exc)]
    return "".join(lines).rstrip("\n").split("\n")


def write_crash(
    run_dir: Path,
    reason: str,
    *,
    step: int | None,
    epoch: int | None = None,
    exc: BaseException | None = None,
    sections: list[tuple[str, list[str]]] | None = None,
    events: list[str] | None = None,
    event_rows: list[dict] | None = None,
    dropped: int = 0,
    open_modules: list[str] | None = None,
    module_lines: list[str] | None = None,
    stacks: str | None = None,
    data: dict | None = None,
) -> tuple[Path, Path]:
    """Write the two crash files and return their paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    txt, jsonl = crash_paths(run_dir)
    lines = [
        f"stethoscope crash dump — {reason}",
        f"time: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"pid: {os.getpid()}",
        f"step: {step}" + (f" (epoch {epoch})" if epoch is not None else ""),
    ]
    if exc is not None:
        lines.append(f"exception: {type(exc).__name__}: {exc}".split("\n")[0])
        lines += ["", "traceback:", *exception_text(exc)]
    for title, body in sections or []:
        lines += ["", f"{title}:", *body]
    if open_modules is not None:
        lines += ["", "modules entered and not left in this step (outermost first):"]
        lines += [f"  {'  ' * i}{n or '<model>'}" for i, n in enumerate(open_modules)] or ["  (none)"]
    try:
        from stethoscope.watchdog import device_memory

        mem = device_memory()
    except Exception:
        mem = None
    lines += ["", "device memory:", f"  {mem}" if mem else "  (no CUDA device in use)"]
    if module_lines:
        lines += ["", f"last module calls ({len(module_lines)}, oldest first):", *module_lines]
    if events is not None:
        lost = f"; {dropped} older event(s) fell out of the ring" if dropped else ""
        lines += ["", f"recorded events before the crash ({len(events)} kept, oldest first{lost}):"]
        lines += [f"  {e}" for e in events] or ["  (none)"]
    if stacks:
        lines += ["", "Python stacks of all threads:", stacks]
    txt.write_text("\n".join(lines) + "\n", encoding="utf-8")

    header = {
        "schema_version": SCHEMA_VERSION,
        "kind": "crash",
        "reason": reason,
        "step": step,
        "epoch": epoch,
        "time": _dt.datetime.now().astimezone().isoformat(),
        "pid": os.getpid(),
        "exception": None if exc is None else {"type": type(exc).__name__, "message": str(exc)},
        "traceback": exception_text(exc),
        "open_modules": open_modules,
        "dropped_events": dropped,
        "text": txt.name,
        "data": data or {},
    }
    with open(jsonl, "w", encoding="utf-8") as fh:
        fh.write(dumps(header) + "\n")
        for row in event_rows or []:
            fh.write(dumps({"schema_version": SCHEMA_VERSION, "kind": "event", **row}) + "\n")
    return txt, jsonl


def read_crash(path: str | Path) -> tuple[dict, list[dict]]:
    """A ``crash-*.jsonl`` file back: (header, events)."""
    header: dict[str, Any] = {}
    events = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if row.get("kind") == "crash":
                header = row
            else:
                events.append(row)
    return header, events
