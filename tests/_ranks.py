"""Launch a test worker script as ``world`` local ranks (CPU, gloo) and wait for them: one helper for every
multi-process test, so each says only what its ranks do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(worker: Path, world: int, out: Path, *args: str, logs: Path | None = None,
                 timeout: float = 150) -> None:
    """Run ``python worker RANK WORLD PORT OUT *args`` for every rank; fail naming the rank and its log tail.

    One thread per rank (``OMP_NUM_THREADS=1``: the ranks share the machine's cores), the repository on
    ``PYTHONPATH``, stethoscope enabled. Output goes to ``rank{N}.log`` files in ``logs`` (default ``out``),
    not pipes: a full pipe would block a rank.
    """
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("STETHOSCOPE_DISABLE", None)
    log_dir = logs if logs is not None else out
    log_dir.mkdir(parents=True, exist_ok=True)
    log_files = [log_dir / f"rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(log_files[r], "w") as fh:
            procs.append(subprocess.Popen([sys.executable, str(worker), str(r), str(world), port, str(out), *args],
                                          stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{log_files[r].read_text()[-3000:]}"
