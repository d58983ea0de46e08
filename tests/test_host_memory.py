import sys

import pytest
import torch

from rankdyna_trainer.host_memory import (
    TRIM_GROWTH,
    FreedHeapTrim,
    reset_peak_resident,
    resident_bytes,
    trim_freed_heap,
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_trim_returns_holes_in_the_heap_to_the_os():
    # Every other 96 KiB tensor freed: holes in the middle of the heap (below glibc's mmap threshold), which glibc
    # keeps resident after free; this is the pattern a reallocation's changed shapes leave behind.
    kept, freed = [], []
    for i in range(400):
        (freed if i % 2 else kept).append(torch.ones(24 * 1024))
    freed_bytes = sum(t.numel() * t.element_size() for t in freed)
    freed.clear()
    before = resident_bytes()
    assert trim_freed_heap()
    assert before - resident_bytes() > freed_bytes / 2
    assert all(float(t[0]) == 1.0 for t in kept[:3])  # what is still referenced stays intact


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_heap_is_trimmed_only_once_the_resident_set_has_grown_by_the_factor():
    trim = FreedHeapTrim()
    assert trim() and trim.trims == 1  # the first call sets the size to grow from
    assert not trim() and trim.trims == 1  # nothing has grown since
    grown = torch.ones(int(TRIM_GROWTH * trim.trimmed_bytes) // 4)  # touched pages: the resident set grows
    assert resident_bytes() > TRIM_GROWTH * trim.trimmed_bytes
    assert trim() and trim.trims == 2
    assert trim.trimmed_bytes >= grown.numel() * 4  # what is referenced stays resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_the_peak_resident_set_is_read_and_reset():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB touched, then freed: the peak stays above the current size
    del big
    trim_freed_heap()
    assert resident_bytes("VmHWM") >= resident_bytes() + 32 * 2**20
    assert reset_peak_resident()
    assert resident_bytes("VmHWM") < resident_bytes() + 32 * 2**20
    assert resident_bytes("NoSuchField") is None
