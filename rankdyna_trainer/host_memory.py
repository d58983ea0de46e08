"""Handing host memory that the C allocator keeps after ``free`` back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


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
    then grows to several times the live memory. Trimming after each reallocation keeps it near the live size.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
