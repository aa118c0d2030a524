"""The flight recorder as a monitor extension: record everything at DEBUG, write it only on a crash.

The HF field note's fix for "log files 1 GB+" was "only DEBUG on crash". Here: every ``logging`` record at
the capture level (the program's and the libraries'), every step boundary, a summary of every flushed step's
statistics, every finding, memory readings and module enter/exit events go into bounded ring buffers in
memory (see :mod:`stethoscope.recorder.buffer` for the bound). Nothing of it is written while the run is
healthy; consoles and log files keep printing exactly what they printed before (see
:mod:`stethoscope.recorder.logcapture`). On a crash — an exception leaving a monitored step, SIGTERM, or
(with ``recorder.on_nonfinite_loss``) the first NaN/Inf loss — the rings are written as ``crash-<time>.txt``
and ``crash-<time>.jsonl`` in the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from stethoscope.extensions import Extension
from stethoscope.hooks import is_compiling, walk_modules
from stethoscope.record import StepRecord
from stethoscope.recorder.buffer import FlightRecorder
from stethoscope.recorder.dump import write_crash
from stethoscope.recorder.logcapture import LogCapture

MAX_DUMPS = 10  # crash dumps one monitor writes at most (a loop that catches its own step errors)
log = logging.getLogger("stethoscope.recorder")


class RecorderExtension(Extension):
    """Keeps the flight recorder for one monitor; see the module docstring."""

    name = "recorder"

    def __init__(self, run: Any):
        cfg = run.config.recorder
        self.cfg = cfg
        self._run = run
        self.run_dir: Path = run.run_dir
        self.recorder = FlightRecorder(cfg.capacity, cfg.max_entry_chars, cfg.module_events)
        self.dumps: list[Path] = []
        self._dumped_ids: set[int] = set()  # exceptions already dumped (the memory extension's OOM dump)
        self._nonfinite_dumped = False
        self._step_started = 0.0
        self._seen_events = 0
        self._hooks = run.hooks("recorder")
        self._sigterm_handler: Any = None
        self._sigterm_prev: Any = None
        self.capture = LogCapture(self.recorder.add_log, cfg.level, cfg.levels).install()
        try:
            model = run.model
            if cfg.module_events > 0 and model is not None:
                self._attach_modules(model)
            if cfg.on_sigterm:
                self._install_sigterm()
        except BaseException:  # a half-built recorder must not leave logging changed
            self.detach()
            raise
        self.recorder.add(
            "start", "stethoscope.recorder",
            f"flight recorder on: {cfg.capacity} events × ≤{cfg.max_entry_chars} chars, "
            f"{cfg.module_events} module events; memory bound {self.recorder.bound_bytes() / 2**20:.1f} MiB",
        )

    # ------------------------------------------------------------------ module events
    def _attach_modules(self, model: Any) -> None:
        rec = self.recorder
        for name, module in walk_modules(model):

            def pre(_m: Any, _a: Any, _name: str = name) -> None:
                if not is_compiling():  # inside a torch.compile'd region: stay out of the graph
                    rec.modules.append((time.perf_counter(), rec.step, _name, True))

            def post(_m: Any, _a: Any, _o: Any, _name: str = name) -> None:
                if not is_compiling():
                    rec.modules.append((time.perf_counter(), rec.step, _name, False))

            # no always_call on the post-hook: a module left by an exception keeps no "exit" event, so the
            # dump can say which modules were running when it struck
            self._hooks.forward_pre(module, pre)
            self._hooks.forward(module, post)

    # ------------------------------------------------------------------ the step protocol
    def begin_step(self, step: int, sampled: bool) -> None:
        rec = self.recorder
        rec.step = step
        self._step_started = time.perf_counter()
        self.capture.refresh()
        rec.add("step", "stethoscope.monitor", f"step {step} begins{' (sampled)' if sampled else ''}")

    def end_step(self, step: int, failed: BaseException | None) -> None:
        ms = (time.perf_counter() - self._step_started) * 1e3
        if failed is None:
            self.recorder.add("step", "stethoscope.monitor", f"step {step} ends after {ms:.1f} ms")
            return
        if isinstance(failed, GeneratorExit | SystemExit):
            return
        self.recorder.add(
            "step", "stethoscope.monitor",
            f"step {step} raised {type(failed).__name__} after {ms:.1f} ms: {str(failed)[:200]}",
            logging.ERROR,
        )
        if self.cfg.on_exception and id(failed) not in self._dumped_ids:
            self.dump(f"{type(failed).__name__} raised in step {step}", exc=failed, step=step)

    def observe(self, record: StepRecord) -> None:
        rec = self.recorder
        parts = [f"step {record.step}{' (sampled)' if record.sampled else ''}"]
        for k, v in list(record.scalars.items())[:8]:
            parts.append(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}")
        if record.sampled:
            if record.grads:
                parts.append(f"grad_norm {record.grad_norm:.4g}")
            parts.append(f"{len(record.acts)} outputs, {len(record.grads)} gradients, {len(record.updates)} updates")
            bad = [n for n, _o, _c, nf, _fin in record.act_calls if nf > 0][:3]
            if bad:
                parts.append("non-finite outputs: " + ", ".join(n or "<model>" for n in bad))
            if record.missing_grads:
                parts.append(f"{len(record.missing_grads)} parameter(s) without gradient")
        rec.add("stats", "stethoscope.monitor", " · ".join(parts))
        for ev in list(self._run.findings.recent):
            rec.add(
                "finding", "stethoscope.findings",
                f"{ev.get('event')} {ev.get('severity')} {ev.get('code')} {ev.get('target')}: {ev.get('message')}",
                logging.WARNING if ev.get("severity") != "info" else logging.INFO,
            )
        loss = record.scalars.get("loss")
        if (self.cfg.on_nonfinite_loss and not self._nonfinite_dumped and isinstance(loss, float)
                and not math.isfinite(loss)):
            self._nonfinite_dumped = True
            self.dump(f"non-finite loss ({loss}) at step {record.step}", step=record.step)

    def note(self, kind: str, source: str, text: str, level: int = logging.DEBUG) -> None:
        """Record one event (other extensions use it: memory readings)."""
        self.recorder.add(kind, source, text, level)

    # ------------------------------------------------------------------ the dump
    def dump(
        self,
        reason: str,
        *,
        exc: BaseException | None = None,
        step: int | None = None,
        sections: list[tuple[str, list[str]]] | None = None,
        data: dict | None = None,
        stacks: bool = False,
    ) -> Path | None:
        """Write ``crash-*.txt`` and ``crash-*.jsonl`` now; returns the text file's path (None past the cap)."""
        if len(self.dumps) >= MAX_DUMPS:
            return None
        if exc is not None:
            self._dumped_ids.add(id(exc))
        rec = self.recorder
        if step is None:
            step = rec.step
        epoch = self._run.epoch
        stack_text = None
        if stacks:
            with contextlib.suppress(Exception):
                from stethoscope.watchdog import thread_stacks

                stack_text = thread_stacks(threading.main_thread().ident)
        txt, _jsonl = write_crash(
            self.run_dir,
            reason,
            step=step,
            epoch=epoch,
            exc=exc,
            sections=sections,
            events=rec.lines(),
            event_rows=rec.rows(),
            dropped=rec.dropped,
            open_modules=rec.open_modules(step) if self.cfg.module_events > 0 else None,
            module_lines=rec.module_lines(),
            stacks=stack_text,
            data=data,
        )
        self.dumps.append(txt)
        return txt

    # ------------------------------------------------------------------ SIGTERM
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
            return
        try:
            prev = signal.getsignal(signal.SIGTERM)
        except (ValueError, OSError):  # pragma: no cover
            return
        ref = weakref.ref(self)

        def handler(signum: int, frame: Any) -> None:
            ext = ref()
            if ext is not None and ext._sigterm_handler is handler:
                with contextlib.suppress(Exception):
                    ext._on_sigterm()
            # chain: the program's own handler, or the default action (terminate with the signal)
            if callable(prev):
                prev(signum, frame)
            elif prev == signal.SIG_IGN:
                return
            else:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            signal.signal(signal.SIGTERM, handler)
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            return
        self._sigterm_handler = handler
        self._sigterm_prev = prev

    def _on_sigterm(self) -> None:
        self.recorder.add("signal", "stethoscope.recorder", "SIGTERM received", logging.ERROR)
        path = self.dump("SIGTERM received", stacks=True)
        if not self._run.closed:
            with contextlib.suppress(Exception):
                self._run.write_meta("crashed", error=f"SIGTERM (flight recorder dump {path.name if path else '-'})")

    def _uninstall_sigterm(self) -> None:
        handler, self._sigterm_handler = self._sigterm_handler, None
        if handler is None:
            return
        with contextlib.suppress(ValueError, OSError):
            if (threading.current_thread() is threading.main_thread()
                    and signal.getsignal(signal.SIGTERM) is handler):
                signal.signal(signal.SIGTERM, self._sigterm_prev if self._sigterm_prev is not None
                              else signal.SIG_DFL)
        # a handler installed over ours since stays; ours, still in its chain, then only passes the signal on

    # ------------------------------------------------------------------ end of run
    def close(self, status: str) -> None:
        self.recorder.add("close", "stethoscope.recorder", f"run {status}")
        self.detach()

    def detach(self) -> None:
        self.capture.uninstall()
        self._uninstall_sigterm()
        self._hooks.remove()

    def state_dict(self) -> dict:
        return {"dumps": [p.name for p in self.dumps]}


def extension(run: Any) -> RecorderExtension | None:
    cfg = getattr(run.config, "recorder", None)
    if cfg is None or not cfg.enabled:
        return None
    return RecorderExtension(run)
