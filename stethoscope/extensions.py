"""Extensions: per-run components the monitor drives besides its statistics and rules.

Memory tracking, the crash flight recorder, attention capture, the TensorBoard sink and the
distributed bookkeeping all need the same few moments of a run — a step begins, a step ends (maybe with
an exception), a step's record is flushed, the run closes — so they share one small protocol instead of
each adding code paths to :class:`~stethoscope.monitor.Monitor`.

An extension module exposes ``extension(run) -> Extension | None``, where ``run`` is the monitor's
:class:`~stethoscope.monitor.context.RunContext` — the only way an extension reaches the monitor (config,
model, guard, hooks, the step collector, metrics rows, findings). It returns ``None`` when the config
switches it off (so a disabled feature costs nothing). The monitor calls every method through its error
guard: an extension that fails is reported as ``monitor.error`` and never breaks the training.
"""

from __future__ import annotations

import importlib
from typing import Any

from stethoscope.record import StepRecord

# Built-in extension modules, in the order the monitor drives them. A module that is absent (an optional
# feature not installed) is skipped; one that fails to build is reported and left out.
BUILTIN_EXTENSIONS: tuple[str, ...] = (
    "stethoscope.memory.extension",
    "stethoscope.recorder.extension",
    "stethoscope.attention.extension",
    "stethoscope.logits.extension",
    "stethoscope.moe.extension",
    "stethoscope.sinks.tensorboard",
    "stethoscope.distributed.extension",
    "stethoscope.coverage",
    "stethoscope.incidents.extension",
    "stethoscope.perf.extension",  # last: its step stamps then follow every other extension's work
)


class Extension:
    """Base class: every hook is optional and does nothing by default.

    Attributes:
        name: key in ``state.json`` and in error messages.
    """

    name: str = "extension"

    def begin_step(self, step: int, sampled: bool) -> None:
        """A ``with mon.step(step):`` block was entered (``sampled``: statistics are on for it)."""

    def end_step(self, step: int, failed: BaseException | None) -> None:
        """The step's block ended; ``failed`` is the exception leaving it (re-raised unchanged after)."""

    def observe(self, record: StepRecord) -> None:
        """A step's record was flushed and the rules have seen it."""

    def close(self, status: str) -> None:
        """The run ends (``finished`` or ``crashed``); called before meta.json and the report are written."""

    def detach(self) -> None:
        """Drop every reference to the model, optimizer and hooks (after :meth:`close`, or on a forgotten
        monitor)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def build_extensions(run: Any, modules: tuple[str, ...] | None = None) -> list[Extension]:
    """Import each extension module (default: :data:`BUILTIN_EXTENSIONS`) and build its extension over
    ``run`` (a :class:`~stethoscope.monitor.context.RunContext`); ``None`` results are dropped."""
    out: list[Extension] = []
    for path in BUILTIN_EXTENSIONS if modules is None else modules:
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name is not None and path.startswith(exc.name):
                continue  # the feature's module is not there (optional extra, or not built yet)
            run.record_error(f"extension {path} (import)", exc)
            continue
        except Exception as exc:
            run.record_error(f"extension {path} (import)", exc)
            continue
        try:
            ext = module.extension(run)
        except Exception as exc:
            run.record_error(f"extension {path} (setup)", exc)
            continue
        if ext is not None:
            out.append(ext)
    return out
