#!/usr/bin/env python
"""The same GLUE run repeated in one process: does anything stay alive between runs, and does the process get
bigger or slower? (docs/cost.md, "Campaign cells side by side").

Runs MRPC, 640 training rows (60 optimizer steps), seed 1, through ``scripts/benchmark_glue.py``'s own runner, N
times in this process. Before each run it prints the resident set, the tensors still alive without a garbage
collection and after one, and the resident set after returning freed heap to the OS; after each run its score,
median step time at the start / middle / end and peak RSS of training.

    python scripts/probes/same_process_runs.py rankdyna 3     # or: dense 3
"""

import gc
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(REPO, "scripts"), REPO]
os.environ.setdefault("WANDB_MODE", "disabled")

import benchmark_glue  # noqa: E402
import torch  # noqa: E402

from rankdyna_trainer.host_memory import release_free_heap, resident_bytes  # noqa: E402


def live_tensor_mib() -> float:
    """Storage bytes of every tensor the garbage collector can see, each storage once."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total / 2**20


def main(method: str, repeats: int) -> None:
    args = benchmark_glue.parse_args([
        "--tasks", "mrpc", "--methods", method, "--budgets", "0.5", "--seeds", "1", "--train_rows", "640",
        "--results_dir", f"/tmp/same_process_runs/{method}", "--models_dir", "/tmp/same_process_runs/models",
        "--no_report", "--same_process"])
    runner = benchmark_glue.Runner(args)
    mib = 2**20
    for i in range(repeats):
        held, rss = live_tensor_mib(), resident_bytes("VmRSS") / mib
        found = gc.collect()
        after = live_tensor_mib()
        release_free_heap()
        print(f"[{i}] before: RSS {rss:.0f} MiB; tensors alive {held:.0f} MiB without a collection, {after:.0f} MiB "
              f"after it ({found} unreachable objects); RSS after the trim {resident_bytes('VmRSS') / mib:.0f} MiB",
              flush=True)
        start = time.perf_counter()
        record = runner.run_one("mrpc", method, None if method == "dense" else 0.5, 1)
        cost = record["step_cost"]
        steps = "/".join(f"{cost['step_s'][p]:.3f}" for p in ("start", "middle", "end"))
        print(f"[{i}] {method}: score {record['score']:.2f}, {time.perf_counter() - start:.0f} s, steps start/middle/"
              f"end {steps} s, peak RSS {cost['peak_rss_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rankdyna", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
