#!/usr/bin/env python
"""Dense fine-tuning versus RankDyna on GLUE tasks, each run a call of run_glue.py's main(); writes a markdown table.

    python scripts/glue_table.py --tasks rte mrpc --budget 0.5 --output_dir outputs/glue_table

Every run uses the same training arguments (below, plus anything after ``--``, passed to every run). Runs go one
after another in this process, so their wall-clock times are comparable with each other (not across machines).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_glue  # noqa: E402

from rankdyna_trainer.experiment.glue_metrics import main_metric  # noqa: E402

COMMON_ARGS = ["--model_name_or_path", "minilm", "--do_train", "--do_eval", "--max_seq_length", "128",
               "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
               "--num_train_epochs", "3", "--learning_rate", "1e-4", "--warmup_steps", "0.06",
               "--logging_steps", "20", "--save_strategy", "no", "--seed", "42"]


# Row name -> run_glue.py flags. `rankdyna_sv_grad` scores singular values as AdaLoRA does (s * dL/ds), the
# ablation of our default gate-gradient signal (docs/method.md).
METHOD_FLAGS = {
    "dense": lambda budget: [],
    "rankdyna": lambda budget: ["--rankdyna", "--rankdyna_budget", str(budget)],
    "rankdyna_sv_grad": lambda budget: ["--rankdyna", "--rankdyna_budget", str(budget),
                                        "--rankdyna_singular_value_signal", "singular_value"],
    # The whitened start (factors of SVD(W S) S^-1, calibrated on 16 training batches) and the full-rank start
    # (factor_budget 2 keeps every group of every matrix), each against the default plain-SVD, break-even start.
    "rankdyna_whitened": lambda budget: ["--rankdyna", "--rankdyna_budget", str(budget), "--rankdyna_init", "whitened"],
    "rankdyna_full_rank": lambda budget: ["--rankdyna", "--rankdyna_budget", str(budget),
                                          "--rankdyna_factor_budget", "2"],
}


def run_argv(task: str, method: str, budget: float, glue_dir: str, output_dir: str, extra: list[str]) -> list[str]:
    argv = ["--task_name", task, "--glue_dir", glue_dir, "--output_dir", os.path.join(output_dir, f"{task}-{method}"),
            *COMMON_ARGS]
    return argv + METHOD_FLAGS[method](budget) + extra


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc"])
    parser.add_argument("--methods", nargs="+", default=["dense", "rankdyna"], choices=sorted(METHOD_FLAGS))
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    parser.add_argument("--output_dir", default="outputs/glue_table")
    parser.add_argument("extra", nargs="*", help="after --: more run_glue.py arguments for every run")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    rows, commands = [], []
    for task in args.tasks:
        for method in args.methods:
            run_args = run_argv(task, method, args.budget, args.glue_dir, args.output_dir, args.extra)
            commands.append("python scripts/run_glue.py " + shlex.join(run_args))
            start = time.perf_counter()
            results = run_glue.main(run_args)
            wall = time.perf_counter() - start
            rows.append(table_row(task, method, results, wall))
            print(rows[-1], flush=True)

    table = render(rows, commands, args, argv)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "glue_table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "glue_table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(table)
    return table


def table_row(task: str, method: str, results: dict, wall_s: float) -> dict:
    evals = results["eval"]
    metrics = {k.removeprefix("eval_"): v for k, v in evals.items()
               if k.removeprefix("eval_") in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")}
    compression = results.get("compression")
    return {
        "task": task, "method": method, "main_metric": main_metric(task), "metrics": metrics,
        "params_fraction": compression["params_fraction"] if compression else 1.0,
        "compressed_params": compression["compressed_params"] if compression else None,
        "train_rows": results["train"]["train_samples"], "dev_rows": evals["eval_samples"],
        "train_runtime_s": results["train"]["train_runtime"], "wall_s": wall_s,
    }


def render(rows: list[dict], commands: list[str], args, argv: list[str]) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"Dense fine-tuning vs RankDyna (budget {args.budget}), packaged MiniLM (all-MiniLM-L6-v2); {date}.",
             "",
             "| task | method | train rows | dev rows | dev metrics | targeted weights kept | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        metrics = ", ".join(f"{name} {100 * value:.1f}" for name, value in row["metrics"].items())
        lines.append(f"| {row['task']} | {row['method']} | {row['train_rows']} | {row['dev_rows']} | {metrics} "
                     f"| {100 * row['params_fraction']:.1f}% "
                     f"| {row['train_runtime_s']:.0f} |")
    lines += ["", "Commands (one per row, as run by `python scripts/glue_table.py "
              + shlex.join(argv) + "`):", "", "```"]
    lines += commands
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
