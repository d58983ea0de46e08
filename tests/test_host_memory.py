import re
import sys

import pytest
import torch

from rankdyna_trainer.host_memory import trim_freed_heap


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_trim_returns_holes_in_the_heap_to_the_os():
    # Every other 96 KiB tensor freed: holes in the middle of the heap (below glibc's mmap threshold), which glibc
    # keeps resident after free; this is the pattern a reallocation's changed shapes leave behind.
    kept, freed = [], []
    for i in range(400):
        (freed if i % 2 else kept).append(torch.ones(24 * 1024))
    freed_bytes = sum(t.numel() * t.element_size() for t in freed)
    freed.clear()
    before = _rss_bytes()
    assert trim_freed_heap()
    assert before - _rss_bytes() > freed_bytes / 2
    assert all(float(t[0]) == 1.0 for t in kept[:3])  # what is still referenced stays intact


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_heap_is_trimmed_only_once_the_resident_set_has_grown_by_the_factor():
    from rankdyna_trainer.host_memory import TRIM_GROWTH, FreedHeapTrim, resident_bytes

    trim = FreedHeapTrim()
    assert trim() and trim.trims == 1  # the first call sets the size to grow from
    assert not trim() and trim.trims == 1  # nothing has grown since
    grown = torch.ones(int(TRIM_GROWTH * trim.trimmed_bytes) // 4)  # touched pages: the resident set grows
    assert resident_bytes() > TRIM_GROWTH * trim.trimmed_bytes
    assert trim() and trim.trims == 2
    assert trim.trimmed_bytes >= grown.numel() * 4  # what is referenced stays resident
