"""The memory monitor as a monitor extension: readings every step, leaks, and out-of-memory context.

Every step (sampled or not) it reads the process RSS and, when the model lives on a CUDA device, the caching
allocator's allocated / reserved / peak bytes — host-side counters, no device sync. The last
``memory.leak_window`` readings are judged every ``leak_window // 10`` steps (:mod:`stethoscope.memory.leak`);
on steady growth it takes a live-tensor snapshot, another ``memory.snapshot_gap`` steps later, and names
what accumulates in the ``memory.leak`` finding (:mod:`stethoscope.memory.tensors`).

Disk stays bounded: a ``kind: "memory"`` metrics row per series is written every ``memory.every`` steps and
on every sampled step (about 25 bytes per step at the default), not every step.

An out-of-memory error leaving a step writes a crash dump (through the flight recorder when it is on, so the
dump also holds the events that led to it) and a critical ``memory.oom`` finding with the step, where it
struck, the shapes of the model's inputs, memory figures, the largest live tensors and the usual remedies.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from typing import Any

import numpy as np

from stethoscope import rundir as rd
from stethoscope.extensions import Extension
from stethoscope.hooks import is_compiling
from stethoscope.memory.leak import CENSUS_PER_STEP, CODE, GRAPHS, OOM_CODE, Growth, judge_window
from stethoscope.memory.oom import (
    input_shapes,
    is_oom,
    numel_of,
    remedies,
    requested_bytes,
    shapes_text,
    where,
)
from stethoscope.memory.readings import RssReader, cuda_figures, cuda_total, mib, model_cuda_device
from stethoscope.memory.tensors import Accumulation, Snapshot, compare, describe_largest, snapshot
from stethoscope.naming import clean_name
from stethoscope.record import StepRecord
from stethoscope.rules import hints as H
from stethoscope.rules.producer import FindingProducer

RSS = "process.rss"
AFTER_EPOCH_STEPS = 5  # an OOM this many steps after an epoch began is "after the epoch transition"

class _Series:
    """The recent readings of one quantity (bytes) and its open-finding state."""

    def __init__(self, target: str, window: int):
        self.target = target
        self.steps: deque = deque(maxlen=window)
        self.values: deque = deque(maxlen=window)

    def add(self, step: int, value: int | None) -> None:
        if value is not None:
            self.steps.append(step)
            self.values.append(value)

    @property
    def full(self) -> bool:
        return len(self.values) == self.values.maxlen

    def judge(self) -> Growth:
        return judge_window(np.fromiter(self.steps, float), np.fromiter(self.values, float))


class MemoryExtension(Extension):
    """See the module docstring."""

    name = "memory"

    def __init__(self, run: Any):
        cfg = run.config.memory
        self.cfg = cfg
        self._run = run
        self.rss = RssReader()
        model = run.model
        self.device = model_cuda_device(model)
        self.total = cuda_total(self.device)
        self.series: dict[str, _Series] = {RSS: _Series(RSS, cfg.leak_window)}
        if self.device is not None:
            self.series[f"{self.device}.allocated"] = _Series(f"{self.device}.allocated", cfg.leak_window)
        self.leaks = FindingProducer(run.rule_context, CODE)  # memory.leak, through the one settle step
        self.ooms = FindingProducer(run.rule_context, OOM_CODE)
        self.check_every = max(1, cfg.leak_window // 10)
        self.investigations_left = cfg.snapshots
        self.pending: dict | None = None  # a leak investigation waiting for its second snapshot
        self.census: Snapshot | None = None  # the last periodic count of live tensors (memory.census_every)
        self.causes: dict[str, Accumulation] = {}  # what an investigation found, per target
        self.last: dict = {}  # the latest readings
        self.steps_seen = 0
        self.sampled = False
        self.epoch = run.epoch
        self.epoch_step: int | None = None  # the first step of the current epoch
        self.epoch_steps: list[tuple[int, int]] = []  # (epoch, first step)
        self.shapes: list[tuple[str, tuple, str]] = []
        self.calls = 0  # calls of the model in the current step
        self.sizes: deque = deque(maxlen=max(cfg.leak_window, 50))  # input elements of recent steps
        self._hooks = run.hooks("memory")
        self._recorder: Any = None
        if cfg.input_shapes and model is not None:
            self._hooks.forward_pre(model, self._pre_hook, with_kwargs=True)

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        try:
            if is_compiling():
                return
            self.shapes = input_shapes(args, kwargs)
            self.calls += 1
        except Exception:  # shapes are context only: never break a forward for them
            pass

    def _recorder_ext(self) -> Any:
        if self._recorder is None:
            self._recorder = self._run.extension("recorder") or False
        return self._recorder or None

    # ------------------------------------------------------------------ the step protocol
    def begin_step(self, step: int, sampled: bool) -> None:
        self.sampled = sampled
        self.calls = 0
        epoch = self._run.epoch
        if epoch != self.epoch:
            self.epoch = epoch
            self.epoch_step = step
            if epoch is not None:
                self.epoch_steps.append((epoch, step))
                rec = self._recorder_ext()
                if rec is not None:
                    rec.note("memory", "stethoscope.memory", f"epoch {epoch} begins at step {step}; {self._line()}")

    def end_step(self, step: int, failed: BaseException | None) -> None:
        if failed is not None:
            if self.cfg.oom_dump and is_oom(failed):
                self._on_oom(step, failed)
            return
        self._read()
        self.steps_seen += 1
        if self.shapes:
            self.sizes.append(numel_of(self.shapes))
        for target, s in self.series.items():
            s.add(step, self.last.get(target))
        if self.sampled or step % self.cfg.every == 0 or self.steps_seen == 1:
            self._write_rows(step)
        rec = self._recorder_ext()
        if rec is not None:
            rec.note("memory", "stethoscope.memory", f"step {step}: {self._line()}")
        if self.pending is not None and step >= self.pending["step"] + self.cfg.snapshot_gap:
            self._finish_investigation(step)
        if self.steps_seen % self.check_every == 0:
            self._check(step)
        if self.cfg.census_every and self.steps_seen % self.cfg.census_every == 0:
            self._take_census(step)

    def _read(self) -> None:
        last = self.last
        last[RSS] = self.rss.read()
        if self.device is None and self.steps_seen % 50 == 0:  # moved to the GPU after the monitor was built
            dev = model_cuda_device(self._run.model)
            if dev is not None:
                self.device, self.total = dev, cuda_total(dev)
                self.series[f"{dev}.allocated"] = _Series(f"{dev}.allocated", self.cfg.leak_window)
        if self.device is not None:
            fig = cuda_figures(self.device)
            if fig is not None:
                last["cuda"] = fig
                last[f"{self.device}.allocated"] = fig["allocated_bytes"]

    def _line(self) -> str:
        parts = [f"rss {mib(self.last.get(RSS))}"]
        fig = self.last.get("cuda")
        if fig:
            parts.append(f"{self.device} allocated {mib(fig['allocated_bytes'])}, reserved "
                         f"{mib(fig['reserved_bytes'])}, peak {mib(fig['peak_bytes'])}")
        return "; ".join(parts)

    def _write_rows(self, step: int) -> None:
        base = {"schema_version": rd.SCHEMA_VERSION, "step": step, "kind": "memory"}
        if self.epoch is not None:
            base["epoch"] = self.epoch
        rss = self.last.get(RSS)
        if rss is not None:
            self._run.write_metrics(base | {"name": "process", f"{self.rss.kind}_bytes": rss})
        fig = self.last.get("cuda")
        if fig:
            self._run.write_metrics(base | {"name": str(self.device), **fig})

    # ------------------------------------------------------------------ leaks
    def _check(self, step: int) -> None:
        leaks = self.leaks
        for target, s in self.series.items():
            if not s.full:
                continue
            g = s.judge()
            th = leaks.threshold(target)
            sev = th.severity(g.growth_mib) if g.steady else None
            if sev is None:
                # closes only once the growth itself is small (a noisy quarter alone does not close it)
                if leaks.is_open(target) and th.healthy(max(g.growth_mib, 0.0), 0.5):
                    leaks.release(target, step, round(g.growth_mib, 2))
                continue
            if leaks.is_open(target):
                self._emit(target, sev, g, th.shown, step, None)
            elif self.pending is not None:
                self.pending["targets"].setdefault(target, (sev, g, th.shown))
            elif self.investigations_left > 0:
                self.investigations_left -= 1
                snap = self._snapshot(step)
                if snap is None:
                    self._emit(target, sev, g, th.shown, step, None)
                else:
                    self.pending = {"step": step, "snapshot": snap, "targets": {target: (sev, g, th.shown)}}
            else:
                self._emit(target, sev, g, th.shown, step, None)

    def _take_census(self, step: int) -> None:
        """Count live tensors; tensors holding an autograd graph that pile up between two counts are a leak.

        This catches what process memory shows only slowly: in a training loop that keeps each step's loss
        (`losses.append(loss)`), backward frees the activations, and what piles up is the graphs' nodes — a
        few KiB per step, lost in the noise of RSS, until it is not.
        """
        snap = self._snapshot(step)
        prev, self.census = self.census, snap
        if prev is None or snap is None or prev.step is None:
            return
        steps = step - prev.step
        acc = compare(prev, snap, steps)
        grown = sum(r["count_growth"] for r in acc.rows if r["holds"].startswith("graph:"))
        leaks = self.leaks
        if acc.pattern is None or (acc.pattern == "append" and grown < max(8, CENSUS_PER_STEP * steps)):
            if leaks.is_open(GRAPHS):  # the pile stopped growing
                leaks.release(GRAPHS, step, grown)
            return
        per_step = grown / max(1, steps)
        message = (
            f"tensors holding an autograd graph pile up: {acc.cause}. Process memory may not show it yet "
            f"(backward freed the activations; each graph's nodes remain), but it grows without bound"
        )
        data = {"window": [prev.step, step], "graph_holders_gained": grown, "per_step": round(per_step, 3),
                "accumulating": acc.rows, "pattern": acc.pattern, "rss_bytes": self.last.get(RSS)}
        leaks.propose(GRAPHS, "warning", grown, round(CENSUS_PER_STEP * steps), step, message,
                      acc.hint or H.hint(CODE), data)
        leaks.settle(step)

    def _snapshot(self, step: int) -> Snapshot | None:
        try:
            return snapshot(step)
        except Exception as exc:
            self._run.record_error("memory snapshot", exc)
            return None

    def _finish_investigation(self, step: int, final: bool = False) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return
        acc = None
        if not final:
            later = self._snapshot(step)
            if later is not None:
                acc = compare(pending["snapshot"], later, step - pending["step"])
        for target, (sev, g, shown) in pending["targets"].items():
            self._emit(target, sev, g, shown, step, acc, first=pending["snapshot"])

    def _emit(self, target: str, severity: str, g: Growth, shown: float | None, step: int,
              acc: Accumulation | None, first: Snapshot | None = None) -> None:
        if acc is None:  # a later update keeps the cause the investigation found
            acc = self.causes.get(target)
        else:
            self.causes[target] = acc
        what = "process RSS" if target == RSS else f"CUDA memory allocated on {target.rsplit('.', 1)[0]}"
        message = (
            f"{what} grew {g.growth_mib:.1f} MiB over steps {g.first_step}–{g.last_step} "
            f"({mib(g.slope)} per step, steadily: each quarter of the window above the one before); "
            f"now {mib(g.level)}"
        )
        if target != RSS and self.total and g.slope > 0:
            reserved = (self.last.get("cuda") or {}).get("reserved_bytes", g.level)
            left = max(0.0, self.total - max(reserved, g.level)) / g.slope
            message += f"; at this rate the device ({mib(self.total)}) is full in about {left:,.0f} steps"
        else:
            message += f"; at this rate +{mib(g.slope * 1000)} per 1000 steps"
        hint = H.hint(CODE)
        data: dict = {
            "slope_bytes_per_step": round(g.slope, 1),
            "growth_mib": round(g.growth_mib, 2),
            "window": [g.first_step, g.last_step],
            "level_bytes": g.level,
            "epochs": [list(e) for e in self.epoch_steps[-5:]],
        }
        if acc is not None:
            if acc.cause:
                message += f". What accumulates: {acc.cause}"
            if acc.hint:
                hint = acc.hint
            data["accumulating"] = acc.rows
            data["pattern"] = acc.pattern
        elif first is not None:
            data["largest_tensors"] = first.largest[:5]
        self.leaks.propose(target, severity, round(g.growth_mib, 2), shown, step, message, hint, data)
        self.leaks.settle(step)

    # ------------------------------------------------------------------ out of memory
    def _on_oom(self, step: int, exc: BaseException) -> None:
        run = self._run
        model = run.model
        names = {}
        if model is not None:
            with contextlib.suppress(Exception):
                names = {id(m): clean_name(n) or "<model>" for n, m in model.named_modules()}
        module, phase = where(exc.__traceback__, names)
        self._read()
        req = requested_bytes(exc)
        fig = self.last.get("cuda")
        snap = self._snapshot(step)
        size = numel_of(self.shapes) if self.shapes else 0
        recent = max(self.sizes) if self.sizes else 0
        grew = bool(self.sizes) and size > recent
        after_epoch = self.epoch_step is not None and 0 <= step - self.epoch_step < AFTER_EPOCH_STEPS
        attn = None
        with contextlib.suppress(Exception):
            attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        fragmented = bool(fig) and fig["reserved_bytes"] - fig["allocated_bytes"] > max(
            2**30, 0.3 * fig["reserved_bytes"])
        fixes = remedies(attn, fragmented, after_epoch, grew)
        where_text = f"during {phase}" + (f" in {module}" if module and module != "<model>" else "")
        lines = [f"  step {step}, {where_text}"]
        if self.epoch_step is not None:
            lines.append(f"  epoch {self.epoch} began at step {self.epoch_step} "
                         f"({step - self.epoch_step} step(s) before this one)")
        lines.append(f"  model inputs: {shapes_text(self.shapes)} ({self.calls} call(s) of the model in this step)")
        if self.sizes:
            lines.append(f"  input elements: {size:,} now; the largest of the last {len(self.sizes)} steps: {recent:,}")
        if req is not None:
            lines.append(f"  failed allocation: {mib(req)}")
        lines.append(f"  process RSS: {mib(self.last.get(RSS))}")
        if fig:
            lines.append(f"  {self.device}: allocated {mib(fig['allocated_bytes'])}, reserved "
                         f"{mib(fig['reserved_bytes'])}, peak {mib(fig['peak_bytes'])}"
                         + (f", total {mib(self.total)}" if self.total else ""))
        if snap is not None:
            lines.append(f"  live tensors: {snap.tensors:,} ({mib(snap.bytes)}); the largest:")
            lines += ["  " + x for x in describe_largest(snap.largest)]
        lines.append("  usual remedies:")
        lines += [f"    - {r}" for r in fixes]
        data = {
            "phase": phase,
            "module": module,
            "inputs": [{"path": p, "shape": list(s), "dtype": d} for p, s, d in self.shapes],
            "model_calls": self.calls,
            "requested_bytes": req,
            "rss_bytes": self.last.get(RSS),
            "cuda": fig,
            "epoch": self.epoch,
            "epoch_first_step": self.epoch_step,
            "after_epoch_boundary": after_epoch,
            "largest_tensors": snap.largest if snap is not None else [],
            "remedies": fixes,
        }
        reason = f"out of memory in step {step}"
        rec = self._recorder_ext()
        path = None
        if rec is not None:
            path = rec.dump(reason, exc=exc, step=step, sections=[("out of memory", lines)], data={"oom": data})
        if path is None:
            from stethoscope.recorder.dump import write_crash

            path, _ = write_crash(run.run_dir, reason, step=step, epoch=self.epoch, exc=exc,
                                  sections=[("out of memory", lines)], data={"oom": data})
        data["dump"] = path.name
        first_line = str(exc).strip().split("\n")[0][:300]
        message = f"out of memory in step {step} {where_text}: {type(exc).__name__}: {first_line}"
        if after_epoch:
            message += f" ({step - self.epoch_step} step(s) after epoch {self.epoch} began)"
        self.ooms.propose(
            module if module and module != "<model>" else None, "critical",
            round(req / 2**20, 1) if req else None, None, step, message,
            H.join(*fixes[:4], H.shared("see_dump", dump=path.name)), data,
        )
        self.ooms.settle(step)
        logging.getLogger("stethoscope.memory").debug("memory.oom finding written, dump %s", path.name)

    # ------------------------------------------------------------------ end of run
    def observe(self, record: StepRecord) -> None:
        return None

    def close(self, status: str) -> None:
        if self.pending is not None:
            self._finish_investigation(self.pending["step"], final=True)

    def detach(self) -> None:
        self._hooks.remove()
        self.rss.close()
        self._recorder = None

    def state_dict(self) -> dict:
        return {"investigations_left": self.investigations_left, "epochs": [list(e) for e in self.epoch_steps]}

    def load_state_dict(self, state: dict) -> None:
        self.investigations_left = int(state.get("investigations_left", self.investigations_left))
        self.epoch_steps = [tuple(e) for e in state.get("epochs", [])]


def extension(run: Any) -> MemoryExtension | None:
    cfg = getattr(run.config, "memory", None)
    if cfg is None or not cfg.enabled:
        return None
    return MemoryExtension(run)
