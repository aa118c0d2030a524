"""Per-rank heartbeats in the run directory, and who is stuck versus who is waiting.

Each rank's watchdog thread publishes ``rank{N}/heartbeat.json`` about once a second (``distributed.
heartbeat_seconds``; an atomic replace of a ~300-byte file): the step, the module path the training thread is
in, when the heartbeat last moved (wall clock), and what the training thread's Python stack is doing right now::

    {"schema_version": 1, "rank": 1, "world_size": 2, "pid": 4242, "host": "node3",
     "step": 3, "in_step": true, "paused": false, "stack": ["", "1"], "last_move": 1767000000.25,
     "published": 1767000003.3, "activity": "user code", "frame": "File \\"train.py\\", line 9, in forward",
     "status": "running"}

When a rank's own watchdog sees a stall it reads every rank's file and sorts the ranks:

* **stuck** — nothing moved for a while and the training thread is in user code, data loading or compiling:
  the rank the others wait for; its module path says where;
* **waiting** — the training thread's Python stack ends in ``backward()`` (DDP's all-reduce runs inside the C++
  autograd engine, so Python shows only the backward call) or in a ``torch.distributed`` call: it waits for
  the stuck ones;
* **silent** — no file, or one not refreshed for several periods: the process died, was killed, or runs no
  watchdog;
* **moving** — its heartbeat is fresh.

The stall finding and its dump then say, on every rank, which rank is stuck in which module and which ranks
wait for it (``data.ranks``, ``data.stuck_ranks``, ``data.waiting_ranks``, ``data.silent_ranks``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from stethoscope import rundir as rd
from stethoscope.watchdog import COLLECTIVE, classify_frames, frames_of

HEARTBEAT = "heartbeat.json"
BACKWARD = "backward"
WAITING_ACTIVITIES = (BACKWARD, COLLECTIVE)

# The innermost Python frame of a thread blocked inside the autograd engine (the C++ part is invisible).
_BACKWARD_FRAMES = (
    ("torch/autograd/graph.py", "_engine_run_backward"),
    ("torch/autograd/__init__.py", "backward"),
    ("torch/autograd/__init__.py", "grad"),
    ("torch/_tensor.py", "backward"),
)


def activity_of(frames: list[tuple[str, int, str]]) -> tuple[str, str]:
    """(activity, deciding frame) of a stack, outermost first: ``backward`` when the innermost frame is the
    autograd engine's entry, else the watchdog's classification (compiling / collective / data loading /
    user code)."""
    if frames:
        path, lineno, fn = frames[-1]
        norm = path.replace("\\", "/")
        for marker, name in _BACKWARD_FRAMES:
            if norm.endswith(marker) and fn == name:
                return BACKWARD, f'File "{path}", line {lineno}, in {fn}'
    cls = classify_frames(frames)
    return cls.kind, cls.frame


def collective_of(activity: str | None, frame: str | None) -> str | None:
    """What a waiting rank waits in: DDP's gradient all-reduce (run by the autograd engine in C++, so Python
    shows only ``backward``), or the ``torch.distributed`` function its innermost frame is in."""
    if activity == BACKWARD:
        return "the gradient all-reduce inside backward"
    if activity == COLLECTIVE and frame:
        name = frame.rsplit(" in ", 1)[-1].strip()
        return name or None
    return None


def _waits_in(entry: dict) -> str:
    activity = str(entry.get("activity"))
    what = entry.get("collective")
    return f"{activity}: {what}" if what and what != activity else activity


def _label(name: str) -> str:
    return name if name else "<model>"


class RankHeartbeats:
    """Publishes this rank's heartbeat and reads everyone's. Driven by the watchdog thread.

    Args:
        parent: the folder holding ``rank0/``, ``rank1/``, ...
        rank, world_size: this process's place.
        period: seconds between publications.
    """

    def __init__(self, parent: Path, rank: int, world_size: int, period: float = 1.0):
        self.parent = Path(parent)
        self.rank = rank
        self.world_size = world_size
        self.period = period
        self._last = 0.0
        self.host = socket.gethostname()
        self.closed = False
        self.errors = 0  # failed publications (the watchdog goes on)

    def path(self, rank: int) -> Path:
        return self.parent / f"rank{rank}" / HEARTBEAT

    # ------------------------------------------------------------------ publishing
    def snapshot(self, hb: Any, thread_id: int | None) -> dict:
        snap = hb.snapshot()
        now_wall, now_mono = time.time(), time.monotonic()
        frames = frames_of(sys._current_frames().get(thread_id)) if thread_id is not None else []
        activity, frame = activity_of(frames)
        return {
            "schema_version": rd.SCHEMA_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "pid": os.getpid(),
            "host": self.host,
            "step": snap["step"],
            "in_step": snap["in_step"],
            "paused": snap["paused"],
            "stack": snap["stack"],
            "phase": snap.get("phase"),
            "last_move": now_wall - (now_mono - snap["stamp"]),
            "published": now_wall,
            "activity": activity,
            "frame": frame,
            "status": "closed" if self.closed else "running",
        }

    def publish(self, hb: Any, thread_id: int | None, force: bool = False) -> None:
        """Write ``rank{N}/heartbeat.json`` if a period has passed (or ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < self.period:
            return
        self._last = now
        path = self.path(self.rank)
        if not path.parent.is_dir():
            return
        rd.write_json_atomic(path, self.snapshot(hb, thread_id), indent=None)

    def tick(self, watchdog: Any) -> None:
        """Called by the watchdog thread after each look at the heartbeat; never raises (a full disk or a
        vanished folder must not stop the watchdog)."""
        try:
            self.publish(watchdog.hb, watchdog.training_thread)
        except Exception:
            self.errors += 1

    def mark_closed(self, hb: Any, thread_id: int | None) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.publish(hb, thread_id, force=True)

    # ------------------------------------------------------------------ reading everyone
    def read_all(self) -> dict[int, dict | None]:
        return {r: rd.read_json(self.path(r)) for r in range(self.world_size)}

    def attribute(self, watchdog: Any, own: dict | None = None) -> dict:
        """Sort every rank into stuck / waiting / silent / moving (see the module docstring).

        ``own`` is this rank's fresh snapshot (the file may be up to a period old). Returns the ``data`` to add
        to the stall finding, with ``message`` (one sentence) and ``waiting_for`` (this rank waits for others).
        """
        now = time.time()
        stall = float(watchdog.config.stall_seconds)
        stale_after = 0.5 * stall  # a peer that stopped about when we did is in the same stall
        silent_after = max(5.0 * self.period, 5.0)
        beats = self.read_all()
        if own is not None:
            beats[self.rank] = own
        ranks: dict[str, dict] = {}
        stuck, waiting, silent, moving = [], [], [], []
        for r, beat in sorted(beats.items()):
            if beat is None:
                silent.append(r)
                ranks[str(r)] = {"state": "silent", "reason": "no heartbeat.json"}
                continue
            idle = max(0.0, now - float(beat.get("last_move", now)))
            age = max(0.0, now - float(beat.get("published", now)))
            entry = {
                "step": beat.get("step"),
                "stack": [_label(n) for n in beat.get("stack") or []],
                "activity": beat.get("activity"),
                "frame": beat.get("frame"),
                "phase": beat.get("phase"),
                "idle_seconds": round(idle, 3),
                "pid": beat.get("pid"),
                "host": beat.get("host"),
            }
            if beat.get("status") == "closed":
                entry["state"] = "closed"
                silent.append(r)
            elif r != self.rank and age > silent_after:
                entry["state"] = "silent"
                entry["reason"] = f"heartbeat not refreshed for {age:.1f} s"
                silent.append(r)
            elif beat.get("activity") in WAITING_ACTIVITIES:
                entry["state"] = "waiting"
                entry["collective"] = collective_of(beat.get("activity"), beat.get("frame"))
                waiting.append(r)
            elif idle >= stale_after or r == self.rank:
                entry["state"] = "stuck"
                stuck.append(r)
            else:
                entry["state"] = "moving"
                moving.append(r)
            ranks[str(r)] = entry
        data = {
            "ranks": ranks,
            "stuck_ranks": stuck,
            "waiting_ranks": waiting,
            "silent_ranks": silent,
            "moving_ranks": moving,
        }
        data["message"], data["waiting_for"] = self._sentence(ranks, stuck, waiting, silent)
        return data

    def _sentence(self, ranks: dict, stuck: list, waiting: list, silent: list) -> tuple[str, list[int]]:
        def where(r: int) -> str:
            e = ranks[str(r)]
            path = " > ".join(e.get("stack") or [])
            inside = f"inside {path}" if path else "outside any module"
            phase = f"in its {e['phase']}, " if e.get("phase") else ""
            return f"rank {r} is stuck {phase}{inside} ({e.get('activity')}, step {e.get('step')}, idle {e['idle_seconds']:.1f} s)"

        parts: list[str] = []
        me = ranks.get(str(self.rank), {})
        culprits = [r for r in stuck if r != self.rank] or [r for r in silent if r != self.rank]
        if me.get("state") == "waiting" and culprits:
            who = ", ".join(str(r) for r in culprits)
            parts.append(f"rank {self.rank} waits in {me.get('activity')} for rank{'s' if len(culprits) > 1 else ''} {who}")
        for r in stuck:
            parts.append(where(r))
        others_waiting = [r for r in waiting if r != self.rank]
        if others_waiting and self.rank in stuck:
            parts.append(f"rank{'s' if len(others_waiting) > 1 else ''} "
                         f"{', '.join(map(str, others_waiting))} wait{'' if len(others_waiting) > 1 else 's'} "
                         f"for it (in {', '.join(sorted({_waits_in(ranks[str(r)]) for r in others_waiting}))})")
        elif others_waiting:
            parts.append(f"waiting: rank{'s' if len(others_waiting) > 1 else ''} {', '.join(map(str, others_waiting))}")
        for r in silent:
            if r != self.rank:
                e = ranks[str(r)]
                parts.append(f"rank {r} is {e['state']}" + (f" ({e['reason']})" if e.get("reason") else ""))
        waiting_for = culprits if me.get("state") == "waiting" else []
        return "; ".join(parts), waiting_for

    def dump_lines(self, data: dict) -> list[str]:
        """The ranks section of a hang dump."""
        lines = ["", f"ranks (this is rank {self.rank} of {self.world_size}; heartbeats in rank*/{HEARTBEAT}):"]
        for r, e in sorted(data["ranks"].items(), key=lambda kv: int(kv[0])):
            path = " > ".join(e.get("stack") or []) or "(no module)"
            lines.append(
                f"  rank {r}: {e.get('state')}"
                + (f" — {e['reason']}" if e.get("reason") else "")
                + (f"; step {e.get('step')}, idle {e.get('idle_seconds', 0):.1f} s, {e.get('activity')}, "
                   + (f"phase: {e['phase']}, " if e.get("phase") else "")
                   + (f"waiting in: {e['collective']}, " if e.get("collective") else "")
                   + f"module path: {path}" if "idle_seconds" in e else "")
            )
            if e.get("frame"):
                lines.append(f"      {e['frame']}")
        if data.get("message"):
            lines.append(f"  => {data['message']}")
        return lines
