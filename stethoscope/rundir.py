"""The run directory on disk: ``meta.json``, ``metrics.jsonl`` and ``findings.jsonl``.

Every file carries ``schema_version``. JSONL files are appended and flushed per sampled step (metrics) or
per event (findings), so a ``kill -9`` loses at most the line being written; every reader tolerates a torn
last line, and a resumed writer cuts it off before appending. ``meta.json`` is replaced atomically (write a temporary file, then rename), so it is always a
whole document. NaN and ±Inf are written as ``null`` / strings so the files stay strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stethoscope.errors import RunDirError

SCHEMA_VERSION = 1
META = "meta.json"
METRICS = "metrics.jsonl"
FINDINGS = "findings.jsonl"
STATE = "state.json"


def json_safe(value: Any) -> Any:
    """Replace NaN by None and ±Inf by "inf"/"-inf", recursively, so ``json.dumps`` writes strict JSON."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())  # numpy scalars
    return value


def flat_safe(row: dict) -> dict:
    """:func:`json_safe` for a flat row of numbers and strings (a metrics row), in one pass.

    A statistics row often holds a NaN (a gradient has no dead-feature count): cleaning it first spares
    :func:`dumps` a failed encoding and the recursive clean-up, about half the cost of writing it.
    """
    return {k: json_safe(v) if isinstance(v, float) and not _FINITE_MIN <= v <= _FINITE_MAX else v
            for k, v in row.items()}


_FINITE_MIN, _FINITE_MAX = -sys.float_info.max, sys.float_info.max  # NaN compares false: outside too


def dumps(record: dict, indent: int | None = None) -> str:
    """Strict JSON of ``record`` (NaN -> null, ±Inf -> "inf"/"-inf"), compact unless ``indent``.

    The C encoder runs first; only a record that holds a NaN/Inf (it raises) takes the slower recursive
    clean-up. That keeps large documents (state.json, rewritten on sampled steps) cheap to write.
    """
    seps = (",", ":") if indent is None else None
    try:
        if indent is None:  # the metrics rows: one encoder for all (json.dumps builds one per call)
            return _COMPACT.encode(record)
        return json.dumps(record, separators=seps, indent=indent, allow_nan=False, default=_default)
    except ValueError:
        return json.dumps(json_safe(record), separators=seps, indent=indent, allow_nan=False, default=str)


def _default(value: Any) -> Any:
    """Numpy scalars and anything else the encoder does not know (NaN inside it is caught by the caller)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("non-finite numpy scalar")  # the json_safe path spells it
        return item
    return str(value)


# What a monitor writes into its run directory: what ``overwrite=True`` removes (and nothing else).
RUN_FILES = (META, METRICS, FINDINGS, STATE, "profile.json", "report.html", "report.md")
RUN_FOLDERS = ("report_files", "tensorboard", "incidents")
RUN_PATTERNS = ("hang-*.txt", "crash-*.txt", "crash-*.jsonl", ".write-test-*", ".*.tmp")
REUSE_HINT = ("pass overwrite=True to replace that run, resume=True to continue it, or choose a new folder "
              "(run_dir=None picks a fresh stethoscope-runs/run-<time>)")


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a stethoscope run (``meta.json``, ``metrics.jsonl`` or ``findings.jsonl``, in it
    or in a ``rank{N}/`` folder under it)."""
    dirs = [path, *(p for p in path.glob("rank*") if p.is_dir() and p.name[4:].isdigit())]
    return any((d / n).is_file() for d in dirs for n in (META, METRICS, FINDINGS))


def clear_run(path: Path, ranks: bool = True) -> list[Path]:
    """Remove the files a monitor wrote into ``path`` (and, with ``ranks``, its ``rank{N}/`` folders); other
    files stay.

    Returns what was removed. Raises :class:`RunDirError` when ``path`` is not empty but holds no run: then
    the folder is someone else's and nothing is removed.
    """
    import shutil

    if not holds_run(path):
        raise RunDirError(
            f"run_dir {str(path)!r} is not empty and holds no stethoscope run (no meta.json, metrics.jsonl or "
            "findings.jsonl), so overwrite will not touch it; choose a new folder"
        )
    removed: list[Path] = []
    rank_dirs = [p for p in path.glob("rank*") if p.is_dir() and p.name[4:].isdigit()] if ranks else []
    for d in [path, *rank_dirs]:
        found = [d / n for n in RUN_FILES if (d / n).is_file()]
        found += [d / n for n in RUN_FOLDERS if (d / n).is_dir()]
        found += [p for pattern in RUN_PATTERNS for p in d.glob(pattern) if p.is_file()]
        for p in found:
            try:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError as exc:
                raise RunDirError(f"could not remove {str(p)!r} to overwrite the run ({exc.strerror or exc})") from None
            removed.append(p)
        if d is not path and not any(d.iterdir()):
            d.rmdir()
    return removed


def prepare(run_dir: str | Path, resume: bool, overwrite: bool = False, reuse_hint: str = REUSE_HINT) -> Path:
    """Create (or reopen, with ``resume``; or replace, with ``overwrite``) a run directory and prove it is
    writable.

    ``overwrite`` removes the files of the run already there (:func:`clear_run`: only what a monitor writes;
    a folder that holds no run is refused). ``reuse_hint`` ends the error for a non-empty folder: what to
    pass instead (the command line names its own flag).

    Raises:
        RunDirError: the path is a file, is not writable, or already holds files and neither ``resume`` nor
            ``overwrite`` is set.
    """
    path = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("resume=True continues the run in run_dir and overwrite=True replaces it: pass one")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir {str(path)!r} exists and is not a directory; pass a folder path")
    if path.is_dir() and any(path.iterdir()) and not resume:
        if not overwrite:
            what = "holds a run" if holds_run(path) else "is not empty"
            raise RunDirError(f"run_dir {str(path)!r} {what}; {reuse_hint}")
        clear_run(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True):
            pass
    except OSError as exc:
        raise RunDirError(
            f"run_dir {str(path)!r} is not writable ({exc.strerror or exc}); choose a folder you can write to"
        ) from None
    return path


def write_json_atomic(path: Path, record: dict, indent: int | None = 2) -> None:
    """Write ``record`` to ``path`` so that readers see the old or the new document, never half.

    ``indent=None`` writes compact JSON (the monitor's state, rewritten on every sampled step).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text = dumps(record, indent=indent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_default)


class JsonlWriter:
    """Appends JSON lines and flushes on demand; counts bytes for the storage bound."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_file() and path.stat().st_size and _last_byte(path) != b"\n":
            _drop_torn_tail(path)  # a torn last line (kill -9) cannot be read: cut it, so the first line
            # appended on resume is not glued to it, and the resumed file is whole
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115  (kept open for the run)
        self.bytes = path.stat().st_size

    def write(self, record: dict) -> None:
        line = dumps(record) + "\n"
        self._fh.write(line)
        self.bytes += len(line)

    def flush(self) -> None:
        if not self._fh.closed:
            self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()


def _drop_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last newline (a file of one torn line becomes empty)."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        pos = size
        while pos > 0:
            step = min(1 << 16, pos)
            fh.seek(pos - step)
            chunk = fh.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                fh.truncate(pos - step + cut + 1)
                return
            pos -= step
        fh.truncate(0)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


class Skipped:
    """What :func:`read_jsonl` left out of one file: ``lines`` (1-based numbers of lines that are not JSON
    objects, the last line excluded) and ``torn_last`` (the number of the last line when it is cut off, as a
    writer killed mid-line leaves it; else None)."""

    def __init__(self) -> None:
        self.lines: list[int] = []
        self.torn_last: int | None = None


def read_jsonl(path: str | Path, skipped: Skipped | None = None) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file, skipping a torn or blank line (e.g. after ``kill -9``).

    ``skipped``, when given, is told which lines were left out (:class:`Skipped`), so a caller can tell the
    expected torn last line from damage in the middle of the file.
    """
    path = Path(path)
    if not path.is_file():
        return
    bad: int | None = None  # the latest unreadable line: reported once a readable one follows it
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            if bad is not None and skipped is not None:
                skipped.lines.append(bad)
            bad = None
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad = number  # a torn last line (the writer died mid-line), or damage if more follows
                continue
            if isinstance(record, dict):
                yield record
            elif skipped is not None:
                skipped.lines.append(number)
    if bad is not None and skipped is not None:
        skipped.torn_last = bad


def tail_is_torn(path: str | Path, window: int = 1 << 16) -> int | None:
    """Whether the last line of a JSONL file is cut off, reading only its end: the line's 1-based number
    counted from the end (``-1``), or None when it is whole (or the file is missing or empty)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - window))
            tail = fh.read()
    except OSError:
        return None
    lines = [ln for ln in tail.split(b"\n") if ln.strip()]
    if not lines or (size > window and len(lines) == 1):
        return None  # empty, or one line longer than the window: not worth reading the whole file for
    try:
        json.loads(lines[-1])
    except ValueError:
        return -1
    return None


def read_json(path: str | Path, problems: list[str] | None = None) -> dict | None:
    """A JSON document as a dict; None when the file is missing or unreadable (``problems``, when given,
    gets one sentence saying why an existing file could not be read)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        if problems is not None:
            problems.append(f"{path} could not be read ({type(exc).__name__}: {exc}); ignored")
        return None
    if not isinstance(doc, dict):
        if problems is not None:
            problems.append(f"{path} holds a JSON {type(doc).__name__}, not an object; ignored")
        return None
    return doc
