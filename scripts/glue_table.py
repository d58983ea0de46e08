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


# Row name -> run_glue.py flags. Every RankDyna row spells out the options it is about, so a row keeps its meaning
# when a default changes. The rows are the ablations of docs/method.md:
#   rankdyna_v0*  the method as first shipped (plain factorized steps, AdaLoRA sensitivity, raw-score greedy);
#   *_full        budget 1.0: factorized training alone, nothing pruned;
#   *_sv_grad     AdaLoRA's s * dL/ds instead of the gate gradient.
# Issue 9's rows trained every group's factors (factor_budget 2 = all groups, the default then).
V0 = ["--rankdyna_factor_scaling", "none", "--rankdyna_importance", "sensitivity", "--rankdyna_rank_by", "score",
      "--rankdyna_min_rank", "0", "--rankdyna_factor_budget", "2"]
FIXED = ["--rankdyna_factor_scaling", "group", "--rankdyna_importance", "fisher", "--rankdyna_rank_by",
         "score_per_param", "--rankdyna_min_rank", "0", "--rankdyna_factor_budget", "2"]


def _rankdyna(*flags: str, budget: float | None = None):
    return lambda b: ["--rankdyna", "--rankdyna_budget", str(budget if budget is not None else b), *flags]


def _replace(flags: list[str], option: str, value: str) -> list[str]:
    out = list(flags)
    out[out.index(option) + 1] = value
    return out


METHOD_FLAGS = {
    "dense": lambda budget: [],
    "rankdyna": _rankdyna(),
    "rankdyna_sv_grad": _rankdyna(*V0, "--rankdyna_singular_value_signal", "singular_value"),
    "rankdyna_v0": _rankdyna(*V0),
    "rankdyna_v0_full": _rankdyna(*V0, budget=1.0),
    "rankdyna_matrix_full": _rankdyna(*_replace(V0, "--rankdyna_factor_scaling", "matrix"), budget=1.0),
    "rankdyna_group_full": _rankdyna(*_replace(V0, "--rankdyna_factor_scaling", "group"), budget=1.0),
    "rankdyna_matrix": _rankdyna(*_replace(V0, "--rankdyna_factor_scaling", "matrix")),
    "rankdyna_group": _rankdyna(*_replace(V0, "--rankdyna_factor_scaling", "group")),
    "rankdyna_group_fisher": _rankdyna(*_replace(FIXED, "--rankdyna_rank_by", "score")),
    "rankdyna_group_fisher_per_param": _rankdyna(*FIXED),
    "rankdyna_v0_fisher_per_param": _rankdyna(*_replace(FIXED, "--rankdyna_factor_scaling", "none")),
    "rankdyna_group_fisher_per_param_min8": _rankdyna(*_replace(FIXED, "--rankdyna_min_rank", "8")),
    # The whitened start (factors of SVD(W S) S^-1, calibrated on 16 training batches) and the full-rank start
    # (factor_budget 2 keeps every group of every matrix trainable).
    "rankdyna_whitened": _rankdyna("--rankdyna_init", "whitened"),
    "rankdyna_full_rank": _rankdyna("--rankdyna_factor_budget", "2"),
}


def run_argv(task: str, method: str, budget: float, glue_dir: str, output_dir: str, extra: list[str],
             seed: int | None = None) -> list[str]:
    name = f"{task}-{method}" if seed is None else f"{task}-{method}-seed{seed}"
    argv = ["--task_name", task, "--glue_dir", glue_dir, "--output_dir", os.path.join(output_dir, name), *COMMON_ARGS]
    seed_args = [] if seed is None else ["--seed", str(seed)]
    return argv + METHOD_FLAGS[method](budget) + extra + seed_args


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc"])
    parser.add_argument("--methods", nargs="+", default=["dense", "rankdyna"], choices=sorted(METHOD_FLAGS))
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run every row once per seed (default: the seed of the common arguments, 42)")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    parser.add_argument("--output_dir", default="outputs/glue_table")
    parser.add_argument("extra", nargs="*", help="after --: more run_glue.py arguments for every run")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    rows, commands = [], []
    for task in args.tasks:
        for method in args.methods:
            for seed in args.seeds or [None]:
                run_args = run_argv(task, method, args.budget, args.glue_dir, args.output_dir, args.extra, seed)
                commands.append("python scripts/run_glue.py " + shlex.join(run_args))
                start = time.perf_counter()
                results = run_glue.main(run_args)
                wall = time.perf_counter() - start
                rows.append(table_row(task, method, results, wall, seed, run_args))
                print(rows[-1], flush=True)

    table = render(rows, commands, args, argv)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "glue_table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "glue_table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(table)
    return table


def loss_curve(output_dir: str) -> list[float]:
    """Training losses at the Trainer's log steps (from trainer_state.json): shows whether a run learned."""
    path = os.path.join(output_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [round(entry["loss"], 4) for entry in json.load(f)["log_history"] if "loss" in entry]


def table_row(task: str, method: str, results: dict, wall_s: float, seed: int | None = None,
              run_args: list[str] | None = None) -> dict:
    evals = results["eval"]
    quality = results.get("quality") or {}
    metrics = {k.removeprefix("eval_"): v for k, v in evals.items()
               if k.removeprefix("eval_") in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")}
    compression = results.get("compression")
    return {
        "task": task, "method": method, "main_metric": main_metric(task), "metrics": metrics,
        "params_fraction": compression["params_fraction"] if compression else 1.0,
        "compressed_params": compression["compressed_params"] if compression else None,
        "train_rows": results["train"]["train_samples"], "dev_rows": evals["eval_samples"],
        "train_runtime_s": results["train"]["train_runtime"], "wall_s": wall_s,
        "seed": seed, "floor": quality.get("floor"), "warnings": quality.get("warnings", []),
        "prediction_spread": quality.get("prediction_spread"), "train_losses": loss_curve(results["output_dir"]),
        "args": run_args,
    }


def render(rows: list[dict], commands: list[str], args, argv: list[str]) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"Dense fine-tuning vs RankDyna (budget {args.budget}), packaged MiniLM (all-MiniLM-L6-v2); {date}.",
             "",
             "| task | method | seed | dev metrics | floor | degenerate? | targeted weights kept | first / last train "
             "loss | train time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        metrics = ", ".join(f"{name} {100 * value:.1f}" for name, value in row["metrics"].items())
        losses = row.get("train_losses") or []
        curve = f"{losses[0]:.3f} / {losses[-1]:.3f}" if losses else "-"
        floor = f"{100 * row['floor']:.1f}" if row.get("floor") is not None else "-"
        lines.append(f"| {row['task']} | {row['method']} | {row.get('seed') or 42} | {metrics} | {floor} "
                     f"| {'; '.join(row.get('warnings') or []) or 'no'} | {100 * row['params_fraction']:.1f}% "
                     f"| {curve} | {row['train_runtime_s']:.0f} |")
    lines += ["", "Commands (one per row, as run by `python scripts/glue_table.py "
              + shlex.join(argv) + "`):", "", "```"]
    lines += commands
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
