"""Cheap memory readings taken at the end of every step: process RSS and, on CUDA, the allocator's figures.

Costs (measured on the issue's CPU box): reading ``/proc/self/statm`` through a descriptor kept open is a
few microseconds; ``torch.cuda.memory_allocated`` / ``memory_reserved`` / ``max_memory_allocated`` read the
caching allocator's counters on the host and never synchronise the device.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

MIB = 2**20


class RssReader:
    """The resident set size of this process, in bytes.

    Linux: ``/proc/self/statm`` (second field, in pages), read with ``os.pread`` on a descriptor kept open.
    Elsewhere: ``psutil`` when it is installed; otherwise ``resource.getrusage``'s peak RSS (``kind`` then
    says ``peak``: a peak never falls, so a leak still shows as growth but a freed spike does not).
    """

    def __init__(self) -> None:
        self.kind = "rss"
        self._fd: int | None = None
        self._proc: Any = None
        self._page = 4096
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._page = os.sysconf("SC_PAGE_SIZE")
        with contextlib.suppress(OSError):
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
            if self._read_statm() is None:
                self.close()
        if self._fd is None:
            try:
                import psutil

                self._proc = psutil.Process()
            except Exception:
                self.kind = "peak_rss"

    def _read_statm(self) -> int | None:
        try:
            data = os.pread(self._fd, 128, 0)  # type: ignore[arg-type]
            return int(data.split()[1]) * self._page
        except (OSError, ValueError, IndexError, TypeError):
            return None

    def read(self) -> int | None:
        if self._fd is not None:
            return self._read_statm()
        if self._proc is not None:
            try:
                return int(self._proc.memory_info().rss)
            except Exception:
                return None
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
        except Exception:
            return None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def model_cuda_device(model: Any) -> Any:
    """The first CUDA device holding a parameter or buffer of ``model``, or None."""
    if model is None:
        return None
    try:
        for t in model.parameters():
            if t.device.type == "cuda":
                return t.device
        for t in model.buffers():
            if t.device.type == "cuda":
                return t.device
    except Exception:
        return None
    return None


def cuda_figures(device: Any) -> dict | None:
    """allocated / reserved / peak bytes on ``device`` (and its total), or None without CUDA there.

    Reads an already initialised CUDA context only: it never creates one.
    """
    if device is None:
        return None
    try:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        return {
            "allocated_bytes": int(torch.cuda.memory_allocated(device)),
            "reserved_bytes": int(torch.cuda.memory_reserved(device)),
            "peak_bytes": int(torch.cuda.max_memory_allocated(device)),
        }
    except Exception:
        return None


def cuda_total(device: Any) -> int | None:
    """The device's total memory in bytes (None when unknown)."""
    if device is None:
        return None
    try:
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    except Exception:
        return None


def mib(value: float | int | None) -> str:
    """Bytes as ``123.4 MiB`` (or ``1.23 GiB`` past 10 GiB)."""
    if value is None:
        return "—"
    v = float(value)
    if abs(v) >= 10 * 2**30:
        return f"{v / 2**30:,.2f} GiB"
    if abs(v) < 0.1 * MIB:
        return f"{v / 2**10:,.1f} KiB"
    return f"{v / MIB:,.1f} MiB"
