"""The hang watchdog: where is the run stuck, and is it only compiling?

A daemon thread reads the :class:`~stethoscope.heartbeat.Heartbeat` that every module hook stamps (sampled
step or not). When nothing has moved for too long — inside one module, inside a step outside any module, or
between steps (data loading) — it writes ``hang-<time>.txt`` into the run directory and a ``hang.stall``
finding: the module path outermost to innermost, how long nothing moved, the Python stacks of every thread,
device memory when CUDA is in use, and a classification read from the stack frames::

    compiling       torch dynamo / inductor / AOT autograd, C++ extension builds, Triton, TorchScript
    collective      waiting in torch.distributed (all_reduce, barrier, ...)
    data loading    inside torch.utils.data (a DataLoader, a Dataset's __getitem__)
    user code       anything else; the innermost frame of the stuck thread is quoted

A module's first call gets ``first_call_stall_seconds`` (compiling is expected there) instead of
``stall_seconds``. A stall classified as compiling is an ``info`` finding; every stall closes once the
heartbeat moves again. No ptrace is needed (py-spy's is refused in most containers): the thread reads
``sys._current_frames()`` in-process, and ``SIGUSR1`` writes the same dump on demand.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from stethoscope.errors import StethoscopeError
from stethoscope.rules import hints as H
from stethoscope.rules.producer import FindingProducer, ProducerContext

CODE = "hang.stall"
EXIT_CODE = 3  # the process exit status with ``on_stall: exit``

COMPILING, COLLECTIVE, DATA, USER = "compiling", "collective", "data loading", "user code"
_HINT_CASE = {COMPILING: "compiling", COLLECTIVE: "collective", DATA: "data", USER: "user"}  # hints.yaml cases

# Path fragments (with "/" separators) of frames that are on the stack only while the named activity runs.
# Runtime wrappers of compiled code (torch/_dynamo/eval_frame.py, aot runtime_wrappers.py) are left out on
# purpose: they stay on the stack while compiled code *runs*, and a hang there is not a compile.
_COMPILE_MARKERS = (
    ("torch/_dynamo/convert_frame.py", "torch dynamo is compiling (tracing Python bytecode into a graph)"),
    ("torch/_dynamo/symbolic_convert.py", "torch dynamo is compiling (tracing Python bytecode into a graph)"),
    ("torch/_dynamo/output_graph.py", "torch dynamo is compiling (building the graph)"),
    ("torch/_inductor/compile_fx.py", "torch inductor is compiling"),
    ("torch/_inductor/codecache.py", "torch inductor is compiling generated code"),
    ("torch/_inductor/async_compile.py", "torch inductor is compiling kernels"),
    ("torch/_inductor/select_algorithm.py", "torch inductor is autotuning kernels"),
    ("torch/_inductor/autotune_process.py", "torch inductor is autotuning kernels"),
    ("torch/_inductor/graph.py", "torch inductor is lowering the graph"),
    ("torch/_inductor/scheduler.py", "torch inductor is scheduling kernels"),
    ("torch/_functorch/aot_autograd.py", "AOT autograd is tracing the graph"),
    ("torch/_functorch/_aot_autograd/jit_compile_runtime_wrappers.py", "AOT autograd is compiling"),
    ("torch/_functorch/_aot_autograd/graph_capture.py", "AOT autograd is tracing the graph"),
    ("torch/utils/cpp_extension.py", "a C++/CUDA extension is being built (torch.utils.cpp_extension)"),
    ("triton/compiler/", "Triton is compiling a kernel"),
    ("triton/runtime/autotuner.py", "Triton is autotuning a kernel"),
    ("triton/runtime/build.py", "Triton is building its launcher"),
    ("torch/jit/frontend.py", "TorchScript is compiling"),
    ("torch/jit/_script.py", "TorchScript is compiling"),
    ("torch/jit/_trace.py", "torch.jit.trace is tracing"),
    ("numba/core/compiler.py", "numba is compiling"),
    ("numba/core/dispatcher.py", "numba is compiling"),
)
_COLLECTIVE_MARKERS = (
    ("torch/distributed/distributed_c10d.py", "waiting in a torch.distributed collective"),
    ("torch/distributed/_functional_collectives.py", "waiting in a torch.distributed collective"),
    ("torch/distributed/c10d_logger.py", "waiting in a torch.distributed collective"),
    ("torch/distributed/rpc/", "waiting in torch.distributed.rpc"),
    ("torch/distributed/elastic/rendezvous/", "waiting in a torch.distributed rendezvous"),
)
_DATA_MARKERS = (
    ("torch/utils/data/", "loading data (torch.utils.data)"),
    ("site-packages/datasets/", "loading data (Hugging Face datasets)"),
)
# Frames that never say where the user's code is stuck.
_LIBRARY_MARKERS = (
    "/stethoscope/",
    "/threading.py",
    "/torch/",
    "site-packages/",
    "dist-packages/",
    "<frozen ",
    "/contextlib.py",
)


@dataclass
class Classification:
    """What a stuck thread is doing, and the frame that decided it (``File "...", line N, in fn``)."""

    kind: str
    reason: str
    frame: str
    innermost: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "reason": self.reason, "frame": self.frame, "innermost": self.innermost}


def _frame_text(filename: str, lineno: int, name: str) -> str:
    return f'File "{filename}", line {lineno}, in {name}'


def classify_frames(frames: list[tuple[str, int, str]]) -> Classification:
    """Classify a stack given as ``(filename, lineno, function)`` tuples, outermost first.

    Compiling wins over everything (a compile may run data loading or user code under it), then a
    collective, then data loading; otherwise it is user code. The deciding frame is the innermost frame
    that matched; for user code, the innermost frame outside libraries (else the innermost frame).
    """
    norm = [(f.replace("\\", "/"), n, fn) for f, n, fn in frames]
    innermost = _frame_text(*frames[-1]) if frames else "(no Python frame)"
    for kind, markers in (
        (COMPILING, _COMPILE_MARKERS),
        (COLLECTIVE, _COLLECTIVE_MARKERS),
        (DATA, _DATA_MARKERS),
    ):
        for i in range(len(norm) - 1, -1, -1):
            path = norm[i][0]
            for marker, reason in markers:
                if marker in path:
                    return Classification(kind, reason, _frame_text(*frames[i]), innermost)
    for i in range(len(norm) - 1, -1, -1):
        if not any(m in norm[i][0] for m in _LIBRARY_MARKERS):
            return Classification(USER, "running user code", _frame_text(*frames[i]), innermost)
    return Classification(
        USER,
        "running code outside the known compile, collective and data-loading paths",
        innermost,
        innermost,
    )


def frames_of(frame: FrameType | None) -> list[tuple[str, int, str]]:
    """``(filename, lineno, function)`` of a live frame and its callers, outermost first."""
    out = []
    while frame is not None:
        out.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    out.reverse()
    return out


def thread_stacks(first: int | None = None) -> str:
    """The Python stacks of all threads as text, thread ``first`` (the training thread) first."""
    names = {t.ident: t for t in threading.enumerate()}
    me = threading.get_ident()
    frames = sys._current_frames()
    order = sorted(frames, key=lambda ident: (ident != first, ident == me))
    parts = []
    for ident in order:
        t = names.get(ident)
        label = f"{t.name}{' (daemon)' if t.daemon else ''}" if t is not None else "unknown thread"
        if ident == first:
            label += " [training thread]"
        if ident == me and ident != first:
            parts.append(f"--- thread {label}, id {ident}: this dump's writer ---\n")
            continue
        parts.append(f"--- thread {label}, id {ident} ---\n" + "".join(traceback.format_stack(frames[ident])))
    return "\n".join(parts)


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x < 100 else f"{x:.0f} s"


def device_memory() -> str | None:
    """One line per CUDA device in use (allocated / reserved / peak), or None without CUDA.

    Reads only an already initialised CUDA context: the watchdog must not create one.
    """
    try:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        lines = []
        for i in range(torch.cuda.device_count()):
            gib = 1024**3
            lines.append(
                f"cuda:{i}: allocated {torch.cuda.memory_allocated(i) / gib:.2f} GiB, reserved "
                f"{torch.cuda.memory_reserved(i) / gib:.2f} GiB, peak {torch.cuda.max_memory_allocated(i) / gib:.2f} GiB"
            )
        return "\n".join(lines)
    except Exception as exc:  # pragma: no cover - a broken driver must not break the dump
        return f"(could not read device memory: {exc})"


class HangError(StethoscopeError, RuntimeError):
    """Raised in the training thread when ``watchdog.on_stall: raise`` is set and a stall is detected.

    Attributes:
        dump: the path of the ``hang-*.txt`` dump written just before (None when raised without one).
    """

    def __init__(
        self,
        message: str = "stethoscope's watchdog detected a stall (on_stall: raise)",
        dump: Path | None = None,
    ):
        self.dump = dump
        super().__init__(message)


@dataclass
class _Stall:
    key: tuple
    target: str
    started: float  # monotonic time of the last heartbeat, i.e. when nothing started moving
    step: int | None
    severity: str
    last_report: float
    acted: bool = False  # on_stall (raise / exit) has been carried out
    dumps: list[Path] = field(default_factory=list)


def _label(name: str) -> str:
    return name if name else "<model>"


class Watchdog:
    """The daemon thread that turns a silent heartbeat into a dump and a ``hang.stall`` finding.

    Args:
        heartbeat: the monitor's heartbeat (written by the training thread, only read here).
        findings: the monitor's :class:`~stethoscope.findings.FindingLog`.
        run_dir: where ``hang-*.txt`` dumps are written.
        config: the ``watchdog`` section (:class:`~stethoscope.config.WatchdogConfig`).
        console: a rich console for the one-line notice (None: print nothing).
        poll_seconds: how often to look; default ``min(1, smallest threshold / 5)``.
        before_exit: called just before ``os._exit`` with ``on_stall: exit`` (the monitor marks its run
            crashed there).
    """

    def __init__(
        self,
        heartbeat: Any,
        findings: Any,
        run_dir: Path,
        config: Any,
        *,
        console: Any = None,
        poll_seconds: float | None = None,
        before_exit: Callable[[str], None] | None = None,
    ):
        self.hb = heartbeat
        self.findings = findings
        # the one path of every finding (this thread's own producers: a producer is not shared across threads)
        self._stalls = FindingProducer(ProducerContext(findings), CODE)
        self._errors = FindingProducer(ProducerContext(findings), "monitor.error")
        self.run_dir = Path(run_dir)
        self.config = config
        self.console = console
        smallest = min(config.stall_seconds, config.first_call_stall_seconds, config.repeat_seconds)
        self.poll = poll_seconds if poll_seconds is not None else min(1.0, smallest / 5)
        self.before_exit = before_exit
        self.training_thread = threading.get_ident()  # the thread that drives the model (creates the monitor)
        self.stall: _Stall | None = None
        self.dumps: list[Path] = []
        self._stop = threading.Event()
        self._lock = threading.RLock()  # one dump at a time (thread vs. signal handler, which may nest)
        self._thread: threading.Thread | None = None
        self._pending_raise: HangError | None = None
        self._old_handler: Any = None
        self._signal_installed = False
        # Multi-rank runs (stethoscope.distributed): publishes this rank's heartbeat on each look and
        # says, on a stall, which rank is stuck and which wait. None when not distributed.
        self.peers: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Watchdog:
        if getattr(self.config, "signal", True):
            self._install_signal()
        self._thread = threading.Thread(target=self._run, name="stethoscope-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, resolve: bool = True) -> None:
        """Stop the thread. With ``resolve`` a stall whose heartbeat has since moved is closed first."""
        if self._thread is None:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None
        if resolve:
            with contextlib.suppress(Exception):
                self.check()
        self._uninstall_signal()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.check()
                if self.peers is not None:
                    self.peers.tick(self)
            except Exception as exc:  # the watchdog must never take the run down by accident
                with contextlib.suppress(Exception):
                    self._errors.propose(
                        "watchdog",
                        "warning",
                        None,
                        None,
                        self.hb.step,
                        f"stethoscope's own code raised {type(exc).__name__}: {exc} (in watchdog); the hang "
                        "watchdog stopped",
                        H.hint("monitor.error"),
                        data={"traceback": traceback.format_exc(), "exception": type(exc).__name__},
                    )
                    self._errors.settle(self.hb.step)
                return

    # ------------------------------------------------------------------ the check
    def check(self, now: float | None = None) -> None:
        """Look at the heartbeat once: open, repeat or close a stall."""
        now = time.monotonic() if now is None else now
        snap = self.hb.snapshot()
        stack: list[str] = snap["stack"]
        key = (snap["in_step"], snap["step"], tuple(stack), snap["stamp"], snap["paused"])
        current = self.stall
        if current is not None and current.key != key:
            self._close(current, snap, now)
            current = None
        if snap["paused"] or (snap["step"] is None and not snap["in_step"] and not stack):
            return  # inside mon.pause(), or before the first step: nothing is expected to move
        idle = now - snap["stamp"]
        innermost = stack[-1] if stack else None
        first_call = innermost is not None and innermost not in self.hb.completed
        threshold = self.config.first_call_stall_seconds if first_call else self.config.stall_seconds
        if current is None:
            if idle >= threshold:
                self._open(snap, key, idle, threshold, first_call, now)
        elif now - current.last_report >= self.config.repeat_seconds:
            self._report(current, snap, idle, threshold, first_call, now, repeat=True)

    def _target(self, snap: dict) -> str:
        if snap["stack"]:
            return snap["stack"][-1]
        return "<step, outside any module>" if snap["in_step"] else "<between steps>"

    def _open(
        self, snap: dict, key: tuple, idle: float, threshold: float, first_call: bool, now: float
    ) -> None:
        stall = _Stall(key, self._target(snap), snap["stamp"], snap["step"], "info", now)
        self.stall = stall
        self._report(stall, snap, idle, threshold, first_call, now, repeat=False)

    def _report(
        self,
        stall: _Stall,
        snap: dict,
        idle: float,
        threshold: float,
        first_call: bool,
        now: float,
        repeat: bool,
    ) -> None:
        frames = frames_of(sys._current_frames().get(self.training_thread))
        cls = classify_frames(frames)
        ranks = self._rank_view()
        if ranks is not None and ranks.get("waiting_for"):  # the all-reduce runs in C++: say whom we wait for
            who = ", ".join(f"rank {r}" for r in ranks["waiting_for"])
            cls = Classification(COLLECTIVE, f"waiting for {who} (see data.ranks)", cls.frame, cls.innermost)
        path = self.write_dump(
            f"stall{' (still stuck)' if repeat else ''}",
            snap=snap,
            idle=idle,
            threshold=threshold,
            first_call=first_call,
            classification=cls,
            extra_lines=self.peers.dump_lines(ranks) if ranks is not None else None,
        )
        stall.dumps.append(path)
        stall.last_report = now
        severity = "info" if cls.kind == COMPILING else "warning"
        stall.severity = severity
        where = self._where(snap)
        message = (
            f"nothing moved for {_secs(idle)} {where} (limit {threshold:g} s"
            f"{', first call' if first_call else ''}): {cls.kind} — {cls.reason}; decided by {cls.frame}"
        )
        hint = H.hint(CODE, _HINT_CASE[cls.kind])
        data = {
            "stack": [_label(n) for n in snap["stack"]],
            "in_step": snap["in_step"],
            "phase": snap.get("phase") if snap["in_step"] else None,
            "first_call": first_call,
            "classification": cls.kind,
            "reason": cls.reason,
            "frame": cls.frame,
            "innermost_frame": cls.innermost,
            "dump": path.name,
            "dumps": [p.name for p in stall.dumps],
        }
        if ranks is not None:
            if ranks.get("message"):
                message += f"; {ranks['message']}"
            data.update({k: v for k, v in ranks.items() if k != "message"})
        self._stalls.propose(stall.target, severity, round(idle, 3), threshold, snap["step"], message, hint, data)
        self._stalls.settle(snap["step"])
        if self.console is not None:
            with contextlib.suppress(Exception):
                from rich.markup import escape

                style = "cyan" if severity == "info" else "yellow"
                self.console.print(
                    f"stethoscope · [{style}]{severity} hang.stall[/] {escape(message)} · dump: "
                    f"{escape(str(path))}",
                    soft_wrap=True,
                )
        if cls.kind != COMPILING and not stall.acted:  # a compile is waited for, never interrupted
            stall.acted = True
            self._act(path, message)

    def _rank_view(self) -> dict | None:
        """Every rank's state from the published heartbeats (None when not distributed or unreadable)."""
        if self.peers is None:
            return None
        try:
            return self.peers.attribute(self, self.peers.snapshot(self.hb, self.training_thread))
        except Exception:  # a missing or torn file must not cost the dump
            return None

    def _where(self, snap: dict) -> str:
        phase = f" ({snap['phase']})" if snap.get("phase") and snap["in_step"] else ""  # stethoscope.perf's
        if snap["stack"]:
            return f"inside {' > '.join(_label(n) for n in snap['stack'])}{phase}"
        if snap["in_step"]:
            if phase:
                return f"in step {snap['step']} outside any module, in its {snap['phase']} phase"
            return f"in step {snap['step']} outside any module (backward, optimizer step or loop body)"
        return f"between steps (after step {snap['step']})"

    def _close(self, stall: _Stall, snap: dict, now: float) -> None:
        self.stall = None
        self._stalls.release(
            stall.target,
            snap["step"] if snap["step"] is not None else stall.step,
            value=round(snap["stamp"] - stall.started, 3)
            if snap["stamp"] != stall.started
            else round(now - stall.started, 3),
        )

    # ------------------------------------------------------------------ on_stall
    def _act(self, path: Path, message: str) -> None:
        mode = self.config.on_stall
        if mode == "dump":
            return
        if mode == "exit":
            with contextlib.suppress(Exception):
                if self.before_exit is not None:
                    self.before_exit(f"HangError: {message} (on_stall: exit; dump {path})")
            if self.console is not None:
                with contextlib.suppress(Exception):
                    self.console.print(
                        f"stethoscope: exiting with status {EXIT_CODE} (watchdog.on_stall: exit)"
                    )
            sys.stdout.flush()
            os._exit(EXIT_CODE)
        # raise: a typed HangError in the training thread.
        err = HangError(f"{message} (watchdog.on_stall: raise; dump {path})", dump=path)
        if self._signal_installed and self.training_thread == threading.main_thread().ident:
            # Our SIGUSR1 handler raises the pending error in the main thread; the signal also interrupts
            # a blocking sleep or wait there, which an asynchronous exception alone would not.
            self._pending_raise = err
            signal.pthread_kill(self.training_thread, signal.SIGUSR1)
            return
        # Otherwise: raised when the thread next runs Python bytecode (a thread blocked in C code sees it
        # only once that call returns).
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(self.training_thread), ctypes.py_object(HangError)
        )

    # ------------------------------------------------------------------ SIGUSR1
    def _install_signal(self) -> None:
        sig = getattr(signal, "SIGUSR1", None)
        if sig is None or threading.current_thread() is not threading.main_thread():
            return
        try:
            current = signal.getsignal(sig)
            if current not in (signal.SIG_DFL, None) and not getattr(current, "_stethoscope", False):
                return  # the program has its own SIGUSR1 handler: leave it alone
            owner = getattr(current, "_stethoscope_owner", None)
            if owner is not None:  # another monitor's (never closed): restore what *it* replaced
                owner = owner()
                current = getattr(owner, "_old_handler", signal.SIG_DFL) if owner is not None else signal.SIG_DFL
            self._old_handler = current
            signal.signal(sig, self._make_handler())
            self._signal_installed = True
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            pass

    def _uninstall_signal(self) -> None:
        if not self._signal_installed:
            return
        self._signal_installed = False
        with contextlib.suppress(ValueError, OSError):
            if threading.current_thread() is threading.main_thread():
                current = signal.getsignal(signal.SIGUSR1)
                owner = getattr(current, "_stethoscope_owner", None)
                if owner is not None and owner() is self:
                    signal.signal(signal.SIGUSR1, self._old_handler or signal.SIG_DFL)

    def _make_handler(self) -> Callable:
        owner = weakref.ref(self)  # the signal table must not keep a forgotten monitor alive

        def handler(signum: int, frame: FrameType | None) -> None:
            dog = owner()
            if dog is None:
                return
            err, dog._pending_raise = dog._pending_raise, None
            if err is not None:
                raise err
            with contextlib.suppress(Exception):
                path = dog.write_dump("SIGUSR1 (on demand)")
                if dog.console is not None:
                    dog.console.print(f"stethoscope: stack dump written to {path}", soft_wrap=True)

        handler._stethoscope = True  # type: ignore[attr-defined]
        handler._stethoscope_owner = owner  # type: ignore[attr-defined]
        return handler

    # ------------------------------------------------------------------ the dump
    def write_dump(
        self,
        reason: str,
        *,
        snap: dict | None = None,
        idle: float | None = None,
        threshold: float | None = None,
        first_call: bool | None = None,
        classification: Classification | None = None,
        extra_lines: list[str] | None = None,
    ) -> Path:
        """Write ``hang-<time>.txt`` now and return its path (what SIGUSR1 and a stall both do)."""
        with self._lock:
            now = time.monotonic()
            snap = snap if snap is not None else self.hb.snapshot()
            if idle is None:
                idle = now - snap["stamp"]
            if classification is None:
                classification = classify_frames(frames_of(sys._current_frames().get(self.training_thread)))
            stack = snap["stack"]
            if first_call is None:
                first_call = bool(stack) and stack[-1] not in self.hb.completed
            state = (
                "paused (mon.pause())"
                if snap["paused"]
                else ("in step" if snap["in_step"] else "between steps")
            )
            lines = [
                f"stethoscope hang dump — {reason}",
                f"time: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
                f"pid: {os.getpid()}",
                f"step: {snap['step']} ({state}); step running for {now - snap['step_started']:.1f} s"
                if snap["in_step"]
                else f"step: {snap['step']} ({state})",
                f"nothing moved for: {idle:.1f} s"
                + (
                    f" (limit {threshold:g} s{', first call of this module' if first_call else ''})"
                    if threshold is not None
                    else ""
                ),
                f"classification: {classification.kind} — {classification.reason}",
                f"  decided by: {classification.frame}",
                f"  innermost frame: {classification.innermost}",
                "",
                "module path (outermost to innermost):",
            ]
            if stack:
                lines += [f"  {'  ' * i}{_label(n)}" for i, n in enumerate(stack)]
                lines.append(
                    f"innermost module: {_label(stack[-1])} (first call: {'yes' if first_call else 'no'})"
                )
            else:
                lines.append("  (no module running: " + (self._where(snap)) + ")")
            lines += extra_lines or []
            mem = device_memory()
            lines += ["", "device memory:", f"  {mem}" if mem else "  (no CUDA device in use)", ""]
            lines.append(f"Python stacks of all threads (training thread id {self.training_thread}):")
            lines.append(thread_stacks(self.training_thread))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
            path = self.run_dir / f"hang-{stamp}.txt"
            n = 1
            while path.exists():
                n += 1
                path = self.run_dir / f"hang-{stamp}-{n}.txt"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            self.dumps.append(path)
            return path
