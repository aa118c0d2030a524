"""A stand-in for the ``findings.jsonl`` writer that keeps every event (for tests that drive rules directly)."""

from __future__ import annotations


class Events:
    """Keeps every event written (open, update and close), without its wall-clock ``time``."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        self.rows.append({k: v for k, v in row.items() if k != "time"})

    def flush(self) -> None:
        pass
