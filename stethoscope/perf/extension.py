"""The step-time breakdown as a monitor extension: phases per step, ``perf`` metrics rows, and three findings.

Every step (sampled or not) it takes a few ``time.perf_counter()`` stamps — at the step's begin and end
(after the monitor's own work there, which :class:`~stethoscope.monitor.context.RunContext` dates), around
the model's top-level forward calls and around the optimizer's ``step()`` — and cuts the step into phases
(:mod:`stethoscope.perf.phases`). Where the model lives on CUDA it also records CUDA events at the same
moments and reads them back once they have completed (:mod:`stethoscope.perf.device`), never with a sync.

Judged every ``perf.publish_every`` steps over the last ``perf.window`` steps:

* ``perf.input_bound`` — the data wait's share of the wall clock (steps far longer than usual, an evaluation
  or a checkpoint, left out);
* ``perf.monitor_overhead`` (``info``: it never changes the run's verdict) — the monitor's own share over the last ``4 × perf.window`` steps: its work at the
  step boundaries (measured) plus what sampled steps' statistics added to forward/backward/optimizer
  (estimated against the unsampled steps' median);
* ``dist.straggler`` — under ``torch.distributed``, this rank's phase medians against the median rank's, from
  the ranks' ``perf.json`` files (:mod:`stethoscope.perf.stragglers`).

It also keeps ``heartbeat.phase`` current, so a hang's heartbeat files say which phase each rank is in.
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path
from typing import Any

from stethoscope import rundir as rd
from stethoscope.extensions import Extension
from stethoscope.perf import stragglers as sg
from stethoscope.perf.device import DeviceTimer, cuda_events_available
from stethoscope.perf.phases import COMPUTE, PHASES, PhaseWindow, StepStamps, median, sampled_excess
from stethoscope.record import StepRecord
from stethoscope.rules import hints as H
from stethoscope.rules.producer import FindingProducer
from stethoscope.rules.thresholds import Threshold, register_threshold

INPUT_BOUND = "perf.input_bound"
MONITOR_OVERHEAD = "perf.monitor_overhead"
STRAGGLER = "dist.straggler"
THRESHOLDS = {
    INPUT_BOUND: Threshold(0.25, 0.5),  # share of the wall clock spent waiting for the next batch
    MONITOR_OVERHEAD: Threshold(0.10, 0.25),  # share of the wall clock spent in the monitor, amortized
    STRAGGLER: Threshold(1.3, 2.0),  # a phase's median / the median rank's
}
for _code, _th in THRESHOLDS.items():
    register_threshold(_code, _th)


def _ms(x: float) -> str:
    return f"{1000.0 * x:.3g} ms"


class PerfExtension(Extension):
    """See the module docstring."""

    name = "perf"

    def __init__(self, run: Any):
        self._run = run
        self.cfg = cfg = run.config.perf
        self.window = PhaseWindow(cfg.window)
        self.overhead: deque[tuple[float, float]] = deque(maxlen=4 * cfg.window)  # (monitor s, total s)
        self.min_steps = max(4, cfg.window // 2)
        self.current: StepStamps | None = None
        self._prev_end: float | None = None
        self._carried = 0.0
        self._block: list[dict[str, float]] = []
        self._block_sampled = 0
        self._block_step = 0
        self._device_block: list[dict[str, float]] = []
        self.steps_seen = 0
        self.distributed = run.rank is not None and run.world_size > 1
        self.parent = Path(run.run_dir).parent
        self.streaks: dict[str, int] = {}
        self.since: dict[str, int] = {}
        self.last_compare: dict | None = None
        self._hints: dict[tuple[str, str], str] = {}
        ctx = run.rule_context
        self.input_bound = FindingProducer(ctx, INPUT_BOUND, {INPUT_BOUND: THRESHOLDS[INPUT_BOUND]})
        self.monitor_overhead = FindingProducer(ctx, MONITOR_OVERHEAD,
                                                {MONITOR_OVERHEAD: THRESHOLDS[MONITOR_OVERHEAD]})
        self.stragglers = FindingProducer(ctx, STRAGGLER, {STRAGGLER: THRESHOLDS[STRAGGLER]})
        model, optimizer = run.model, run.optimizer
        device = next((p.device for p in model.parameters()), None) if model is not None else None
        self.device = DeviceTimer() if cfg.device_events and cuda_events_available(device) else None
        hooks = run.hooks("perf")
        if model is not None:
            hooks.forward_pre(model, self._forward_start)
            hooks.forward(model, self._forward_end, always_call=True)
        if optimizer is not None:
            hooks.step_pre(optimizer, self._optimizer_start)
            hooks.step_post(optimizer, self._optimizer_end)

    # ------------------------------------------------------------------ hooks (every step: stamps only)
    def _forward_start(self, module: Any, args: Any) -> None:
        st = self.current
        if st is not None:
            st.forward.append((time.perf_counter(), None))
            self._run.heartbeat.phase = "forward"
            if self.device is not None:
                self.device.mark("fwd_start")

    def _forward_end(self, module: Any, args: Any, output: Any) -> None:
        st = self.current
        if st is not None and st.forward and st.forward[-1][1] is None:
            st.forward[-1] = (st.forward[-1][0], time.perf_counter())
            self._run.heartbeat.phase = "backward"
            if self.device is not None:
                self.device.mark("fwd_end")

    def _optimizer_start(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        st = self.current
        if st is not None and st.opt_start is None:
            st.opt_start = time.perf_counter()
            self._run.heartbeat.phase = "optimizer"
            if self.device is not None:
                self.device.mark("opt_start")

    def _optimizer_end(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        st = self.current
        if st is not None and st.opt_start is not None:
            st.opt_end = time.perf_counter()
            self._run.heartbeat.phase = "other"
            if self.device is not None:
                self.device.mark("opt_end")

    # ------------------------------------------------------------------ the step
    def begin_step(self, step: int, sampled: bool) -> None:
        now = time.perf_counter()
        entered = self._run.step_entered_at
        self.current = StepStamps(step, sampled, prev_end=self._prev_end,
                                  entered=entered if entered is not None and entered <= now else now,
                                  begun=now, carried=self._carried)
        self._run.heartbeat.phase = "data"
        if self.device is not None:
            self.device.mark("begin")

    def end_step(self, step: int, failed: BaseException | None) -> None:
        now = time.perf_counter()
        st, self.current = self.current, None
        self._run.heartbeat.phase = "data"
        if st is None or failed is not None:
            if self.device is not None:
                self.device.discard_open()
            self._prev_end, self._carried = None, 0.0
            return
        ending = self._run.step_ending_at
        st.ending = ending if ending is not None and st.begun <= ending <= now else now
        st.ended = now
        if self.device is not None:
            self.device.mark("end")
            self.device.end_step(step)
        self._add(st)
        self._carried = time.perf_counter() - now  # this extension's own work, the next step's "monitor"
        self._prev_end = now

    def _add(self, st: StepStamps) -> None:
        phases = st.phases()
        if st.sampled:  # what the statistics' hooks added inside forward/backward/optimizer
            base = median(sum(r[p] for p in COMPUTE) for r, s in zip(self.window.rows, self.window.sampled,
                                                                          strict=True) if not s)
            unsampled = sum(1 for s in self.window.sampled if not s)
            extra = sampled_excess(phases, base) if unsampled >= 4 else 0.0
            phases["monitor_estimated"] = extra
        else:
            extra = 0.0
        self.window.add(st.step, st.sampled, phases)
        self.overhead.append((phases["monitor"] + extra, phases["total"]))
        self.steps_seen += 1
        if st.sampled and self._block:  # a sampled step gets a row of its own: its cost shows
            self._write_block(self._block_step)
        self._block.append(phases)
        self._block_step = st.step
        self._block_sampled += int(st.sampled)
        if self.device is not None:
            self._device_block.extend(p for _, p in self.device.poll())
        if len(self._block) >= self.cfg.every or st.sampled:
            self._write_block(st.step)
        if self.steps_seen % self.cfg.publish_every == 0:
            self._judge(st.step)

    # ------------------------------------------------------------------ rows
    def _write_block(self, step: int) -> None:
        block, self._block = self._block, []
        if not block or self._run.metrics_capped:
            self._device_block, self._block_sampled = [], 0
            return
        n = len(block)
        row: dict[str, Any] = {"schema_version": rd.SCHEMA_VERSION, "step": step, "kind": "perf", "name": "step",
                               "steps": n, "sampled": self._block_sampled}
        for p in (*PHASES, "total"):
            row[f"{p}_ms"] = round(1000.0 * sum(r[p] for r in block) / n, 4)
        est = [r["monitor_estimated"] for r in block if "monitor_estimated" in r]
        if est:
            row["monitor_estimated_ms"] = round(1000.0 * sum(est) / n, 4)
        if self._device_block:
            for key in sorted({k for d in self._device_block for k in d}):
                vals = [d[key] for d in self._device_block if key in d]
                row[f"{key}_ms"] = round(1000.0 * sum(vals) / len(vals), 4)
            row["device_steps"] = len(self._device_block)
        self._device_block, self._block_sampled = [], 0
        self._run.write_metrics(row)

    # ------------------------------------------------------------------ judging
    def _judge(self, step: int) -> None:
        if len(self.window) < self.min_steps:
            return
        self._judge_input(step)
        self._judge_overhead(step)
        if self.distributed:
            self._judge_stragglers(step)

    def _judge_input(self, step: int) -> None:
        share = self.window.share("data")
        wait = self.window.median("data")
        producer = self.input_bound
        if not math.isfinite(share):
            return
        if wait * 1000.0 < self.cfg.min_wait_ms:
            producer.release("data", step, share)
        else:
            n = len(self.window)
            producer.judge(
                "data", share, step,
                lambda: (f"the training loop waited for its next batch {100 * share:.0f} % of the time over the "
                         f"last {n} steps (median wait {_ms(wait)} per step, step {_ms(self.window.median('total'))})"),
                lambda: self._hint(INPUT_BOUND),
                data={"share": share, "median_wait_s": wait, "median_step_s": self.window.median("total"),
                      "steps": n},
            )
        producer.settle(step)

    def _judge_overhead(self, step: int) -> None:
        if len(self.overhead) < min(self.overhead.maxlen or 0, 2 * self.window.size):
            return
        mon = sum(m for m, _ in self.overhead)
        total = sum(t for _, t in self.overhead)
        n = len(self.overhead)
        if total <= 0:
            return
        share = mon / total
        producer = self.monitor_overhead
        if mon / n * 1000.0 < self.cfg.min_monitor_ms:
            producer.release("monitor", step, share)
        else:
            est = sum(r.get("monitor_estimated", 0.0) for r in self.window.rows)
            producer.judge(
                "monitor", share, step,
                lambda: (f"stethoscope itself took {100 * share:.1f} % of the wall clock over the last {n} steps "
                         f"({_ms(mon / n)} per step on average), over its budget"),
                lambda: self._hint(MONITOR_OVERHEAD),
                data={"share": share, "monitor_s_per_step": mon / n, "steps": n,
                      "sampled_estimate_s": est},
                severity="info",  # the tool's cost, not the training's health: said, never the run's verdict
            )
        producer.settle(step)

    def _judge_stragglers(self, step: int) -> None:
        run = self._run
        try:
            sg.publish(self.parent, run.rank, sg.summary(run.rank, self.window))
            peers = sg.read_peers(self.parent, run.world_size)
        except OSError:
            return
        result = sg.compare(run.rank, peers, self.min_steps, max_lag=2 * self.cfg.publish_every + 2)
        self.last_compare = result
        producer = self.stragglers
        if result is None:
            producer.settle(step)
            return
        first = self.window.steps[0]
        for phase, c in result.items():
            target = f"rank{run.rank}.{phase}"
            th = producer.threshold(target)
            slow = th.severity(c["ratio"]) is not None and c["excess_share"] >= self.cfg.straggler_min_share
            if not slow:
                self.streaks[phase] = 0
                self.since.pop(phase, None)
                if th.healthy(c["ratio"], producer.clear_factor) or c["excess_share"] < self.cfg.straggler_min_share:
                    producer.release(target, step, c["ratio"])
                continue
            self.streaks[phase] = self.streaks.get(phase, 0) + 1
            since = self.since.setdefault(phase, first)
            if self.streaks[phase] < self.cfg.persist:
                continue
            span = step - since + 1
            producer.judge(
                target, c["ratio"], step,
                (f"rank {run.rank}'s {phase} is {c['ratio']:.2f}× the median rank's ({_ms(c['own'])} vs "
                 f"{_ms(c['reference'])} per step, +{100 * c['excess_share']:.0f} % of a step) for {span} steps"),
                lambda phase=phase: self._hint(STRAGGLER, phase, rank=run.rank),
                data={"rank": run.rank, "phase": phase, "steps": span, **c},
            )
        producer.settle(step)

    def _hint(self, code: str, case: str = "default", **params: Any) -> str:
        """A hint rendered once (an open finding is updated at every judgment; rendering costs ~ms)."""
        key = (code, case)
        if key not in self._hints:
            self._hints[key] = H.hint(code, case, **params)
        return self._hints[key]

    # ------------------------------------------------------------------ the end
    def observe(self, record: StepRecord) -> None:
        return None

    def close(self, status: str) -> None:
        if self.device is not None:
            self._device_block.extend(p for _, p in self.device.poll())
        if self._block:
            self._write_block(self._block_step)

    def detach(self) -> None:
        self.current = None
        self.device = None

    def summary(self) -> dict:
        """Median seconds per phase over the window (for tests and the benchmark)."""
        return self.window.medians((*PHASES, "total"))


def extension(run: Any) -> PerfExtension | None:
    """The step-time breakdown, unless ``perf.enabled`` is false."""
    if not run.config.perf.enabled:
        return None
    return PerfExtension(run)
