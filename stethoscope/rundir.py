"""The run directory on disk: ``meta.json``, ``metrics.jsonl`` and ``findings.jsonl``.

Every file carries ``schema_version``. JSONL files are appended and flushed per sampled step (metrics) or
per event (findings), so a ``kill -9`` loses at most the line being written; every reader tolerates a torn
last line. ``meta.json`` is replaced atomically (write a temporary file, then rename), so it is always a
whole document. NaN and ±Inf are written as ``null`` / strings so the files stay strict JSON.
"""

from __future__ import annotations

import json
import math
import os
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


def dumps(record: dict, indent: int | None = None) -> str:
    """Strict JSON of ``record`` (NaN -> null, ±Inf -> "inf"/"-inf"), compact unless ``indent``.

    The C encoder runs first; only a record that holds a NaN/Inf (it raises) takes the slower recursive
    clean-up. That keeps large documents (state.json, rewritten on sampled steps) cheap to write.
    """
    seps = (",", ":") if indent is None else None
    try:
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


def prepare(run_dir: str | Path, resume: bool) -> Path:
    """Create (or reopen, with ``resume``) a run directory and prove it is writable.

    Raises:
        RunDirError: the path is a file, is not writable, or already holds a run and ``resume`` is False.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir {str(path)!r} exists and is not a directory; pass a folder path")
    if path.is_dir() and any(path.iterdir()) and not resume:
        raise RunDirError(
            f"run_dir {str(path)!r} is not empty; pass resume=True to continue that run, "
            "or choose a new folder"
        )
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


class JsonlWriter:
    """Appends JSON lines and flushes on demand; counts bytes for the storage bound."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115  (kept open for the run)
        self.bytes = path.stat().st_size
        if self.bytes and _last_byte(path) != b"\n":  # a torn last line (kill -9): end it, so the
            self._fh.write("\n")  # first line appended on resume is not glued to it and lost
            self.bytes += 1

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


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file, skipping a torn or blank line (e.g. after ``kill -9``)."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line: the writer died mid-line
            if isinstance(record, dict):
                yield record


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None
