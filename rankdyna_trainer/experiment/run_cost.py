"""What a training run costs: optimizer-step times over the run and the peak memory of training.

Used by ``scripts/bench_cost.py`` (dense fine-tuning against RankDyna, side by side) and ``scripts/bench_memory.py``.
On the CPU the memory figure is the peak resident set size (``VmHWM``) over training, reset when training starts;
on a GPU it is ``torch.cuda.max_memory_allocated`` over training.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from transformers import TrainerCallback

from ..host_memory import release_free_heap, reset_peak_resident, resident_bytes


class RunCost(TrainerCallback):
    """Records each optimizer step's wall time and the peak memory from ``on_train_begin`` to ``on_train_end``.

    Add it after the method's own callback so the step times include RankDyna's per-step work. Each step is also
    split at the Trainer's hooks (``step_parts``): ``forward_backward`` (on_step_begin to on_pre_optimizer_step:
    forward, backward, gradient clipping, and the pre-optimizer hooks of callbacks that run before this one, such as
    RankDyna's scoring and reallocation), ``optimizer`` (``optimizer.step()``) and ``after`` (scheduler, zero_grad).
    """

    def __init__(self):
        self.step_seconds: list[float] = []
        self.train_seconds: float | None = None
        self.peak_bytes: int | None = None
        self.memory_kind = ""
        self.start_bytes: int | None = None
        self.step_cpu_seconds: list[float] = []
        self.train_cpu_seconds: float | None = None
        self.step_parts: dict[str, list[float]] = {"forward_backward": [], "optimizer": [], "after": []}
        self._step_start = self._train_start = self._step_cpu = self._train_cpu = 0.0
        self._pre_optimizer = self._optimizer_done = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.memory_kind = "cuda_max_allocated"
        else:
            release_free_heap()
            self.memory_kind = "peak_rss" if reset_peak_resident() else "peak_rss_since_start"
        self.start_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else resident_bytes("VmRSS")
        self._train_start, self._train_cpu = time.perf_counter(), time.process_time()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start, self._step_cpu = time.perf_counter(), time.process_time()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._pre_optimizer = _synchronized_clock()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._optimizer_done = _synchronized_clock()

    def on_step_end(self, args, state, control, **kwargs):
        end = _synchronized_clock()
        self.step_seconds.append(end - self._step_start)
        for part, seconds in (("forward_backward", self._pre_optimizer - self._step_start),
                              ("optimizer", self._optimizer_done - self._pre_optimizer),
                              ("after", end - self._optimizer_done)):
            self.step_parts[part].append(seconds)
        # CPU time of this process (all its threads): the work done, less sensitive than wall time to other load.
        self.step_cpu_seconds.append(time.process_time() - self._step_cpu)

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self._train_start
        self.train_cpu_seconds = time.process_time() - self._train_cpu
        self.peak_bytes = (torch.cuda.max_memory_allocated() if self.memory_kind == "cuda_max_allocated"
                           else resident_bytes("VmHWM"))

    def summary(self) -> dict:
        return {"train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
                "steps": len(self.step_seconds), "step_seconds": phase_step_seconds(self.step_seconds),
                "step_cpu_seconds": phase_step_seconds(self.step_cpu_seconds), "peak_bytes": self.peak_bytes,
                "start_bytes": self.start_bytes, "memory_kind": self.memory_kind,
                "step_part_seconds": {part: phase_step_seconds(times) for part, times in self.step_parts.items()},
                "all_step_seconds": self.step_seconds, "all_step_cpu_seconds": self.step_cpu_seconds}


def _synchronized_clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@contextlib.contextmanager
def hook_seconds(callback_class: type, hook: str):
    """Time every call of ``callback_class.<hook>`` (e.g. RankDyna's ``on_pre_optimizer_step``) within the block:
    yields the list the call times are appended to. A benchmark's instrument, for a callback it does not construct
    itself (``scripts/run_glue.py`` builds RankDyna's); the class is restored on exit."""
    original = getattr(callback_class, hook)
    seconds: list[float] = []

    def timed(self, *args, **kwargs):
        start = _synchronized_clock()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds.append(_synchronized_clock() - start)

    setattr(callback_class, hook, timed)
    try:
        yield seconds
    finally:
        setattr(callback_class, hook, original)


def phase_step_seconds(step_seconds: list[float]) -> dict[str, float]:
    """Median step time at the start (first 10 % of steps, the first two left out as warm-up), the middle (45-55 %)
    and the end (last 10 %) of a run: for RankDyna, before pruning, while pruning and at the target budget."""
    n = len(step_seconds)
    if n < 10:
        raise ValueError(f"phase_step_seconds needs at least 10 steps, got {n}.")
    phases = {"start": (2, max(3, n // 10)), "middle": (int(0.45 * n), max(int(0.45 * n) + 1, int(0.55 * n))),
              "end": (n - max(1, n // 10), n)}
    return {name: statistics.median(step_seconds[a:b]) for name, (a, b) in phases.items()}


def schedule_step_cost(step_cost: dict[float, float], budget) -> float:
    """Mean step cost (a fraction of a dense step) over a RankDyna run on ``budget``'s schedule (a
    :class:`~rankdyna_trainer.budget.ParameterBudget`), when a step at kept fraction ``f`` costs ``step_cost[f]``
    (linear between the measured fractions; ``scripts/bench_step_profile.py`` measures them).

    A step runs the allocation of the last reallocation before it (every group, ``f = 1``, until the first); a
    reallocation step before the target runs every group (masked groups are scored, ``masked_group_scoring``'s
    default), so it costs ``step_cost[1]``. This is what the schedule allows, with nothing else in the run.
    """
    points = sorted(step_cost.items())
    if points[-1][0] != 1.0 or points[0][0] > budget.target_fraction:
        raise ValueError(f"step_cost needs kept fractions from the target ({budget.target_fraction}) to 1, got "
                         f"{[f for f, _ in points]}.")

    def cost(fraction: float) -> float:
        for (f0, c0), (f1, c1) in zip(points, points[1:]):
            if f0 <= fraction <= f1:
                return c0 + (c1 - c0) * (fraction - f0) / (f1 - f0)
        return points[0][1]

    kept, total = 1.0, 0.0
    for step in range(budget.total_steps):
        if budget.is_reallocation_step(step):
            total += cost(1.0)
            kept = budget.fraction_at(step)
        else:
            total += cost(kept)
    return total / budget.total_steps
