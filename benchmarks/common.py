"""Helpers the benchmarks share: the machine line of every table, thresholds, intervals, malloc's bytes in use, batches of a split.

A benchmark imports them from here (``from common import cpu_name``; Python puts the script's
folder, benchmarks/, on the path), never from another benchmark.
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import statistics

import torch

__all__ = ["cpu_name", "allocator", "median_thresholds", "interval", "T95", "malloc_in_use", "batches"]

# two-sided 95 % Student t quantiles by degrees of freedom (beyond 30: the normal's 1.96 is within 2 %)
T95 = [math.nan, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def allocator() -> str:
    """The C allocator's settings that change CPU timings: glibc's MALLOC_* variables and an LD_PRELOAD-ed allocator.

    benchmarks/allocator.py measures what they change.
    """
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or (k == "LD_PRELOAD" and v)]
    return "allocator " + (" ".join(tuned) if tuned else "glibc defaults")


def median_thresholds(model, images: torch.Tensor) -> list[float]:
    """Each early exit's median confidence on `images`: about half of those still running leave at each exit."""
    with torch.no_grad():
        return [float(z.softmax(-1).amax(-1).median()) for z in model.forward_exits(images)[:-1]]


def interval(values) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95 % Student t interval."""
    n = len(values)
    mean = statistics.fmean(values)
    return mean, (T95[n - 1] if n - 1 < len(T95) else 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t)
                for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use():
    """A function returning the bytes glibc's malloc has handed out and not taken back, or None without glibc >= 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def batches(split, size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A split of the corrupted digits (``.x``, ``.y``) as ``(inputs, labels)`` batches of `size`, for `collect_exit_logits`."""
    return [(split.x[i : i + size], split.y[i : i + size]) for i in range(0, len(split), size)]
