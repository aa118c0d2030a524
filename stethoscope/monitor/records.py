"""From a step's host rows to a :class:`~stethoscope.record.StepRecord`, and from the record to disk.

:func:`build_record` turns what the collector brought back (one array per queued row) into per-module,
per-parameter statistics: calls of one module merged (or kept apart with ``stats.per_call``), the update
row split per parameter. :class:`MetricsWriter` writes the record as ``metrics.jsonl`` rows and keeps the
file under ``storage.max_metrics_mb`` (past it only scalar rows are written, and one info finding says so).
:func:`console_line` is the one line the console prints for a step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stethoscope import rundir as rd
from stethoscope.collector import Entry, merge_stats
from stethoscope.console import SEVERITY_STYLE
from stethoscope.errors import MonitorUsageError
from stethoscope.findings import FindingLog
from stethoscope.record import ActRecord, AmpRecord, GradRecord, StepRecord, UpdateRecord
from stethoscope.rules import hints as H
from stethoscope.rules.producer import FindingProducer, ProducerContext
from stethoscope.stats import RAW_WIDTH


def scalar_value(key: str, value: Any) -> Any:
    """A value ``mon.log(key=value)`` accepts: a number, or a one-element tensor kept on its device (read
    at the flush, with the step's rows: no sync here)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MonitorUsageError(
                f"mon.log({key}=...) needs a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        return value.detach().reshape(())
    if not isinstance(value, int | float | np.floating | np.integer):
        raise MonitorUsageError(
            f"mon.log({key}=...) needs a number or a one-element tensor, got {type(value).__name__}"
        )
    return value


def build_record(step: int | None, pending: dict | None, entries: list[Entry], rows: list, dead: dict,
                 values: dict[str, float], epoch: int | None, per_call: bool) -> StepRecord:
    """The step's record. ``pending``: ``{"sampled", "missing"}`` from the step's end (None: scalars only);
    ``rows[i]`` is the host array of ``entries[i]``; ``dead``: per-feature dead counts by (kind, name, output);
    ``values``: scalars already on the host (device scalars arrive as ``scalar`` entries)."""
    record = StepRecord(step=step, sampled=bool(pending and pending["sampled"]), epoch=epoch)
    record.missing_grads = list(pending["missing"]) if pending else []
    record.forward_modes = dict(pending.get("modes") or {}) if pending else {}
    act_groups: dict[tuple, list] = {}
    order: list[tuple] = []
    for entry, row in zip(entries, rows, strict=True):
        if row is None:
            continue
        if entry.kind == "scalar":
            values[entry.name] = float(row[0])
        elif entry.kind in ("act", "input"):
            key = (entry.kind, entry.name, entry.output, entry.call if per_call else 0)
            if key not in act_groups:
                act_groups[key] = []
                order.append(key)
            act_groups[key].append((entry, row))
            if entry.kind == "act":
                # the inputs' flag (forward.py): 0 when every input entry was finite, a count or NaN if not
                finite_in = not (row.shape[0] > RAW_WIDTH and row[RAW_WIDTH] != 0)
                record.act_calls.append((entry.name, entry.output, entry.call, float(row[0]), finite_in))
        elif entry.kind == "grad":
            st = merge_stats([(row[:RAW_WIDTH], entry.count)], 0, None)
            record.grads[entry.name] = GradRecord(entry.name, st)
        elif entry.kind == "update":
            names = entry.extra["names"]
            measured = entry.extra.get("measured", names)
            m = len(measured)  # row: ‖Δw‖ of the m measured parameters, then ‖w‖ of all of them
            deltas = {name: float(row[i]) for i, name in enumerate(measured)}
            for i, name in enumerate(names):
                wn = float(row[m + i])
                if name not in deltas:  # outside this step's update budget: ‖w‖ only
                    record.updates[name] = UpdateRecord(name, math.nan, wn, math.nan, measured=False)
                    continue
                dn = deltas[name]
                ratio = dn / wn if wn > 0 else (math.inf if dn > 0 else 0.0)
                record.updates[name] = UpdateRecord(name, dn, wn, ratio)
        elif entry.kind == "amp":  # the GradScaler: [scale, folded skips, one flag per scaler step]
            flags = [bool(v > 0) for v in row[2:]]
            this = flags[-1] if entry.extra.get("this_step") and flags else None
            record.amp = AmpRecord(float(row[0]), this, flags, int(entry.extra.get("folded", 0)),
                                   round(float(row[1])))
            values["amp_scale"] = record.amp.scale
        else:  # a kind an extension queued (e.g. attn): handed over as it came
            record.extras.setdefault(entry.kind, []).append((entry, row))
    for key in order:
        kind, name, output, call = key
        group = act_groups[key]
        first = group[0][0]
        parts = [(row[:RAW_WIDTH], e.count) for e, row in group]
        dead_count = None if per_call else dead.get((kind, name, output))
        st = merge_stats(parts, first.features, dead_count)
        rec = ActRecord(name, output, len(group), st, call if per_call else None)
        (record.acts if kind == "act" else record.inputs)[(name, output, rec.call)] = rec
    record.scalars = values
    return record


class MetricsWriter:
    """``metrics.jsonl``: the records' rows, and rows extensions write, under a size cap.

    Args:
        path: the file.
        max_mb: ``storage.max_metrics_mb``; past it only scalar rows are written.
        findings: where the one ``monitor.storage`` info finding goes when the cap is reached.
    """

    def __init__(self, path: Path, max_mb: float, findings: FindingLog):
        self._writer = rd.JsonlWriter(path)
        self.max_mb = max_mb
        self._storage = FindingProducer(ProducerContext(findings), "monitor.storage")
        self.capped = False

    def write_row(self, row: dict) -> None:
        self._writer.write(row)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def write_record(self, record: StepRecord) -> None:
        w = self._writer
        base = {"schema_version": rd.SCHEMA_VERSION, "step": record.step}
        for name, value in record.scalars.items():
            w.write(base | {"kind": "scalar", "name": name, "value": value})
        capped = w.bytes > self.max_mb * 1e6
        if capped and not self.capped:
            self.capped = True
            self._storage.propose(
                "metrics.jsonl", "info", round(w.bytes / 1e6, 1), self.max_mb, record.step,
                "metrics.jsonl reached storage.max_metrics_mb; from now on only scalar rows are written",
                H.hint("monitor.storage"))
            self._storage.settle(record.step)
        if not capped:
            for rec in record.acts.values():
                w.write(rd.flat_safe(base | {"kind": "act", "name": rec.name, "output": rec.output,
                                             "calls": rec.calls, **({"call": rec.call} if rec.call is not None
                                                                    else {}), **rec.stats.as_dict()}))
            for rec in record.inputs.values():
                w.write(rd.flat_safe(base | {"kind": "input", "name": rec.name, "calls": rec.calls,
                                             **({"call": rec.call} if rec.call is not None else {}),
                                             **rec.stats.as_dict()}))
            for rec in record.grads.values():
                w.write(rd.flat_safe(base | {"kind": "grad", "name": rec.name, "missing": False,
                                             **rec.stats.as_dict()}))
            for name in record.missing_grads:
                w.write(base | {"kind": "grad", "name": name, "missing": True})
            for rec in record.updates.values():
                if not rec.measured:
                    continue  # no ‖Δw‖ this step: no row (its last measured one stands)
                w.write(base | {"kind": "update", "name": rec.name, "update_norm": rec.update_norm,
                                "weight_norm": rec.weight_norm, "ratio": rec.ratio})
        if record.grads:  # a scalar row: kept past the storage cap too
            w.write(base | {"kind": "scalar", "name": "grad_norm", "value": record.grad_norm})
        w.flush()


def console_line(record: StepRecord, new: list[dict]) -> str:
    """``stethoscope · step N · loss … · grad-norm … · <findings opened since the last line>`` (rich markup)."""
    parts = [f"[bold]step {record.step}[/]"]
    if "loss" in record.scalars:
        parts.append(f"loss {record.scalars['loss']:.4g}")
    if record.grads:
        parts.append(f"grad-norm {record.grad_norm:.3g}")
    for event in new[:3]:
        style = SEVERITY_STYLE.get(event["severity"], "")
        parts.append(f"[{style}]{event['severity']} {event['code']}[/] {event['target']}")
    if len(new) > 3:
        parts.append(f"+{len(new) - 3} more")
    return "stethoscope · " + " · ".join(parts)


def due_line(record: StepRecord, new: list[dict], every: int, logged_lines: int) -> bool:
    """Whether the console prints this step: on findings, on sampled steps (``console.every: 0``) or every
    ``every``-th logged step."""
    show = record.sampled if every == 0 else (logged_lines % every == 0)
    return bool(show or new)

