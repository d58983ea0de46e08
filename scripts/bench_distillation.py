"""What RankDyna's self-distillation costs: training-step time and peak memory of the packaged MiniLM, real Trainer,
with and without ``distillation_weight`` (the settings take turns run by run, ``--repeats`` times each).

    python scripts/bench_distillation.py --weights 0 0.5 --steps 12 --batch_size 32 --seq_len 64 --threads 1

Step times are CPU seconds of this process (less sensitive to other load than wall time) over the steps after the
teacher is taken (the first ``warmup_fraction`` of the steps are left out); memory is the peak RSS over training
(``torch.cuda.max_memory_allocated`` on a GPU), as rankdyna_trainer.experiment.run_cost measures it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WARMUP_FRACTION = 0.25


def one_run(weight: float, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model
    from rankdyna_trainer.experiment.run_cost import RunCost
    from rankdyna_trainer.packaged_models import minilm_path

    class TeacherBytes(TrainerCallback):
        bytes = 0

        def on_step_end(self, args_, state, control, **kwargs):
            teacher = rankdyna.distillation.teacher if rankdyna.distillation else None
            if teacher is not None:
                self.bytes = sum(t.nbytes for t in (*teacher.parameters(), *teacher.buffers()))

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    config = RankDynaConfig(target_budget=0.33, warmup_fraction=WARMUP_FRACTION, final_fraction=0.25,
                            reallocation_interval=2, distillation_weight=weight)
    prepare_model(model, config)
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    data = Dataset.from_dict({"input_ids": torch.randint(1000, 20000, (n, args.seq_len), generator=g).tolist(),
                              "labels": torch.randint(0, 2, (n,), generator=g).tolist()})
    cost, teacher_bytes, rankdyna = RunCost(), TeacherBytes(), RankDynaCallback(config)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                     learning_rate=5e-5, report_to=[], save_strategy="no", logging_steps=10**6,
                                     use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0)
        Trainer(model=model, args=training, train_dataset=data,
                callbacks=[rankdyna, cost, teacher_bytes]).train()
    after = cost.step_cpu_seconds[round(WARMUP_FRACTION * args.steps):]
    return {"step_cpu_s": statistics.median(after), "peak_bytes": cost.peak_bytes, "teacher_bytes": teacher_bytes.bytes,
            "memory_kind": cost.memory_kind}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.5])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per weight, taking turns")
    args = parser.parse_args(argv)
    if args.steps < 8:
        parser.error(f"--steps must be at least 8 (a warm-up, a pruning phase and a final phase), got {args.steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    for weight in args.weights:
        if not 0 <= weight <= 1:
            parser.error(f"--weights take distillation weights in [0, 1], got {weight}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {w: [] for w in args.weights}
    for _ in range(args.repeats):
        for weight in args.weights:
            runs[weight].append(one_run(weight, args))
    base = args.weights[0]
    kind = runs[base][0]["memory_kind"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.seq_len}, "
          f"{args.steps} steps, {args.repeats} run(s) each; memory: {kind}")
    print("| distillation_weight | step CPU s (after the snapshot) | of weight " f"{base:g} | peak memory (MiB) | "
          "teacher (MiB) |\n|---|---|---|---|---|")
    step = {w: statistics.median(r["step_cpu_s"] for r in rs) for w, rs in runs.items()}
    for weight, rs in runs.items():
        peak = statistics.median(r["peak_bytes"] for r in rs) / 2**20
        print(f"| {weight:g} | {step[weight]:.3f} | {step[weight] / step[base]:.2f} | {peak:.0f} | "
              f"{rs[0]['teacher_bytes'] / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
