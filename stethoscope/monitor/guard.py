"""Never break the training being watched: stethoscope's own exceptions become findings.

Every hook body, rule, extension and integration callback runs through an :class:`ErrorGuard`. An exception
is reported once per place as a ``monitor.error`` warning (with its traceback in ``data``) and training goes
on without that measurement. ``CriticalFindingError`` (``stop_on: critical``) is the one exception that
passes: the user asked for it.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable
from typing import Any

import torch

from stethoscope.errors import CriticalFindingError
from stethoscope.findings import FindingLog
from stethoscope.rules import hints as H
from stethoscope.rules.producer import FindingProducer, ProducerContext, RulesSettings

CODE = "monitor.error"


class ErrorGuard:
    """Runs callables for the monitor and reports what they raise.

    Args:
        findings: where the ``monitor.error`` findings go.
        step: the current step (for the finding's step), read when an error is reported.
    """

    def __init__(self, findings: FindingLog, step: Callable[[], int | None]):
        # every place that failed is reported: no cap on open monitor.error findings
        self._producer = FindingProducer(ProducerContext(findings, settings=RulesSettings(max_open=1 << 30)), CODE)
        self.step = step
        self._seen: set[str] = set()

    def __call__(self, where: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` under ``no_grad``; an exception becomes one finding for ``where`` (returns None)."""
        try:
            with torch.no_grad():
                return fn(*args)
        except CriticalFindingError:
            raise
        except Exception as exc:  # never break the training we watch
            self.record(where, exc)
            return None

    def record(self, where: str, exc: BaseException) -> None:
        """Report ``exc`` raised at ``where``, once per place."""
        if where in self._seen:
            return
        self._seen.add(where)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=6))
        with contextlib.suppress(Exception):  # the findings file itself failed
            step = self.step()
            self._producer.propose(
                where, "warning", None, None, step,
                f"stethoscope's own code raised {type(exc).__name__}: {exc} (in {where}); "
                "training continues without that measurement",
                H.hint("monitor.error"),
                {"traceback": tb, "exception": type(exc).__name__},
            )
            self._producer.settle(step)
