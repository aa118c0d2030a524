"""``stethoscope replay``: the command's body (the option parsing lives in :mod:`stethoscope.cli`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from stethoscope.incidents.replay import render, replay


def run_replay(incident: Path, model_dir: Path | None, factory: str | None, device: str, top: int,
               out: Path | None, as_json: bool, console: Any) -> None:
    """Replay ``incident`` and print what it found (JSON with ``as_json``); ``out`` gets ``trace.jsonl``."""
    trace_path = (out / "trace.jsonl") if out is not None else None
    result = replay(incident, factory=factory, model_dir=model_dir, device=device, top=top, trace_path=trace_path)
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
    else:
        render(result, console)
