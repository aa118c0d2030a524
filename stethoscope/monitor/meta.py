"""What ``meta.json`` says about a run, and the process facts the monitor starts from.

Kept apart from the step machinery: these run once at start, at a crash and at close, never per step.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stethoscope import __version__
from stethoscope import rundir as rd


def disabled_by_env() -> bool:
    """``STETHOSCOPE_DISABLE`` set to anything but empty / 0 / false / no turns every monitor into a no-op."""
    return os.environ.get("STETHOSCOPE_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def dist_rank() -> tuple[int | None, int]:
    """(rank, world size) when torch.distributed is initialised with more than one process."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - exotic builds
        pass
    return None, 1


def default_run_dir() -> Path:
    """``stethoscope-runs/run-<time>``, suffixed ``-2``, ``-3``, ... when that folder exists."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("stethoscope-runs") / f"run-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_arguments(model: Any, optimizer: Any, schedule: Any) -> None:
    """A typed error naming the bad argument, before anything is written."""
    from stethoscope.errors import MonitorUsageError

    if not isinstance(model, nn.Module):
        raise MonitorUsageError(f"Monitor needs a torch.nn.Module as model, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise MonitorUsageError(
            f"optimizer must be a torch.optim.Optimizer (or None), got {type(optimizer).__name__}"
        )
    if schedule is not None and not callable(schedule):
        raise MonitorUsageError(f"schedule must be a callable step -> bool, got {schedule!r}")


def prepare_run_dir(run_dir: str | Path | None, resume: bool, rank: int | None,
                    overwrite: bool = False) -> tuple[Path, bool]:
    """(the run directory, created or checked, ``rank{N}/`` under it when distributed; whether it resumes
    an earlier run). ``overwrite`` replaces the run already there (each rank its own ``rank{N}/``; rank 0
    also the merged files above them)."""
    base = Path(run_dir) if run_dir is not None else default_run_dir()
    if rank is not None:
        if overwrite and rank == 0 and base.is_dir() and rd.holds_run(base):
            rd.clear_run(base, ranks=False)  # the merged meta/findings of the earlier run
        base = base / f"rank{rank}"
    path = rd.prepare(base, resume, overwrite)
    return path, resume and (path / rd.META).is_file()


def write_outputs(run_dir: Path, config: Any, console: Any) -> None:
    """At close: ``report.html`` / ``report.md`` (when ``report.enabled``) and the console summary (unless
    ``console.quiet``). A failing report is a console line, never an exception: the run itself finished."""
    try:
        if config.report.enabled:
            from stethoscope.report import write_report

            write_report(run_dir, plots=config.report.plots)
    except Exception as exc:
        console.print(f"[yellow]stethoscope: could not write the report: {exc}[/]")
    if not config.console.quiet:
        from stethoscope.report import print_summary

        print_summary(run_dir, console=console)


def model_summary(model: nn.Module | None) -> dict:
    """Class, parameter counts, module count, dtypes and devices (empty once the model is gone)."""
    if model is None:
        return {}
    params = list(model.parameters())
    return {
        "class": type(model).__name__,
        "parameters": int(sum(p.numel() for p in params)),
        "trainable_parameters": int(sum(p.numel() for p in params if p.requires_grad)),
        "modules": sum(1 for _ in model.modules()),
        "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
        "devices": sorted({str(p.device) for p in params}),
    }


def optimizer_summary(opt: torch.optim.Optimizer | None) -> dict | None:
    """The optimizer's class and each group's plain hyper-parameters."""
    if opt is None:
        return None
    groups = []
    for g in opt.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params" and isinstance(v, int | float | bool | str)}
                      | {"params": len(g["params"])})
    return {"class": type(opt).__name__, "groups": groups}


def versions() -> dict:
    """The versions that explain a run's numbers: stethoscope, torch, Python, CUDA, transformers."""
    out = {
        "stethoscope": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    tf = sys.modules.get("transformers")
    if tf is not None:
        out["transformers"] = getattr(tf, "__version__", None)
    return out


class MetaWriter:
    """Writes ``meta.json``: at start (``running``), on a step that raised, on SIGTERM, at close.

    A resumed run keeps its first ``started_at`` and the model summary of the process that had the model,
    and counts its resumptions.
    """

    def __init__(self, run_dir: Path, resumed: bool, config: Any, schedule: Any, rank: int | None,
                 world_size: int):
        self.path = run_dir / rd.META
        self.resumed = resumed
        self.config = config
        self.schedule = schedule
        self.rank, self.world_size = rank, world_size
        self.started = _dt.datetime.now(_dt.UTC)

    def write(self, status: str, *, last_step: int | None, model: nn.Module | None,
              optimizer: torch.optim.Optimizer | None, verdict: dict, error: str | None) -> None:
        old = rd.read_json(self.path) if self.resumed else None
        meta = {
            "schema_version": rd.SCHEMA_VERSION,
            "status": status,
            "started_at": (old or {}).get("started_at", self.started.isoformat()),
            "ended_at": _dt.datetime.now(_dt.UTC).isoformat() if status != "running" else None,
            "last_step": last_step,
            "rank": self.rank,
            "world_size": self.world_size,
            "versions": versions(),
            "model": model_summary(model) or (old or {}).get("model", {}),
            "optimizer": optimizer_summary(optimizer),
            "config": self.config.model_dump(mode="json"),
            "schedule": repr(self.schedule),
            "verdict": verdict,
        }
        if error is not None:
            meta["error"] = error
        if self.resumed and old:
            meta["resumed"] = int(old.get("resumed", 0)) + (1 if status == "running" else 0)
        rd.write_json_atomic(self.path, meta)
