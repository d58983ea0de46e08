"""This process's host memory: its resident set (now and peak), and freed heap handed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re

# Trim only once the resident set has grown by this factor since the last trim. Trimming hands freed pages back, so
# the next steps fault them in again; a model that reallocates every few steps should not pay that each time. On
# MiniLM (CoLA at 0.2, 80 reallocations) the policy changes neither time nor peak RSS beyond noise (docs/cost.md).
TRIM_GROWTH = 1.25


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    # glibc only; musl, macOS and Windows have no malloc_trim and need none of this.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_freed_heap() -> bool:
    """Return freed heap to the OS (glibc's ``malloc_trim(0)``); False where the C library has no such call.

    A RankDyna run changes its tensors' shapes at every reallocation (the kept-groups path gathers the kept
    columns), and glibc serves each new shape from fresh heap while it keeps the old chunks: the resident set
    then grows to several times the live memory. :class:`FreedHeapTrim` trims once that growth adds up.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_free_heap() -> None:
    """Hand memory that is freed but still held by glibc's allocator back to the OS (no effect elsewhere).

    Preparing RankDyna (factorization, calibration) frees large temporaries that glibc may keep mapped; without
    this the training peak would count them although training never uses them.
    """
    import gc

    gc.collect()
    trim_freed_heap()


def resident_bytes(field: str = "VmRSS") -> int | None:
    """This process's resident set size from Linux's ``/proc/self/status``: ``VmRSS`` (now) or ``VmHWM`` (its peak
    since start or since :func:`reset_peak_resident`); None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError, ValueError):
        return None


def reset_peak_resident() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class FreedHeapTrim:
    """Calls :func:`trim_freed_heap` when the resident set has grown by more than ``TRIM_GROWTH`` since the last
    trim (always the first time): the resident set stays within that factor of its trimmed size, and a run whose
    shapes keep changing does not pay the page faults of a trim at every change."""

    def __init__(self):
        self.trimmed_bytes: int | None = None
        self.trims = 0

    def __call__(self) -> bool:
        rss = resident_bytes()
        if rss is None or (self.trimmed_bytes is not None and rss <= TRIM_GROWTH * self.trimmed_bytes):
            return False
        if not trim_freed_heap():
            return False
        self.trims += 1
        self.trimmed_bytes = resident_bytes()
        return True
