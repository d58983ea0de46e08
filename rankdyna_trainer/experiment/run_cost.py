"""What a training run costs: optimizer-step times over the run and the peak memory of training.

Used by ``scripts/bench_cost.py`` (dense fine-tuning against RankDyna, side by side) and ``scripts/bench_memory.py``.
On the CPU the memory figure is the peak resident set size (``VmHWM``) over training, reset when training starts;
on a GPU it is ``torch.cuda.max_memory_allocated`` over training.
"""

from __future__ import annotations

import re
import statistics
import time

import torch
from transformers import TrainerCallback

from ..host_memory import trim_freed_heap


def rss_bytes(field: str = "VmRSS") -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) resident set size of this process, from /proc."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def release_free_heap() -> None:
    """Hand memory that is freed but still held by glibc's allocator back to the OS (no effect elsewhere).

    Preparing RankDyna (factorization, calibration) frees large temporaries that glibc may keep mapped; without
    this the training peak would count them although training never uses them.
    """
    import gc

    gc.collect()
    trim_freed_heap()


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RunCost(TrainerCallback):
    """Records each optimizer step's wall time and the peak memory from ``on_train_begin`` to ``on_train_end``.

    Add it after the method's own callback so the step times include RankDyna's per-step work.
    """

    def __init__(self):
        self.step_seconds: list[float] = []
        self.train_seconds: float | None = None
        self.peak_bytes: int | None = None
        self.memory_kind = ""
        self.start_bytes: int | None = None
        self.step_cpu_seconds: list[float] = []
        self.train_cpu_seconds: float | None = None
        self._step_start = self._train_start = self._step_cpu = self._train_cpu = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.memory_kind = "cuda_max_allocated"
        else:
            release_free_heap()
            self.memory_kind = "peak_rss" if reset_peak_rss() else "peak_rss_since_start"
        self.start_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else rss_bytes("VmRSS")
        self._train_start, self._train_cpu = time.perf_counter(), time.process_time()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start, self._step_cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self._step_start)
        # CPU time of this process (all its threads): the work done, less sensitive than wall time to other load.
        self.step_cpu_seconds.append(time.process_time() - self._step_cpu)

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self._train_start
        self.train_cpu_seconds = time.process_time() - self._train_cpu
        self.peak_bytes = (torch.cuda.max_memory_allocated() if self.memory_kind == "cuda_max_allocated"
                           else rss_bytes("VmHWM"))

    def summary(self) -> dict:
        return {"train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
                "steps": len(self.step_seconds), "step_seconds": phase_step_seconds(self.step_seconds),
                "step_cpu_seconds": phase_step_seconds(self.step_cpu_seconds), "peak_bytes": self.peak_bytes,
                "start_bytes": self.start_bytes, "memory_kind": self.memory_kind,
                "all_step_seconds": self.step_seconds, "all_step_cpu_seconds": self.step_cpu_seconds}


def phase_step_seconds(step_seconds: list[float]) -> dict[str, float]:
    """Median step time at the start (first 10 % of steps, the first two left out as warm-up), the middle (45-55 %)
    and the end (last 10 %) of a run: for RankDyna, before pruning, while pruning and at the target budget."""
    n = len(step_seconds)
    if n < 10:
        raise ValueError(f"phase_step_seconds needs at least 10 steps, got {n}.")
    phases = {"start": (2, max(3, n // 10)), "middle": (int(0.45 * n), max(int(0.45 * n) + 1, int(0.55 * n))),
              "end": (n - max(1, n // 10), n)}
    return {name: statistics.median(step_seconds[a:b]) for name, (a, b) in phases.items()}
