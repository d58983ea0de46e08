#!/usr/bin/env python
"""Controls beside the GLUE campaign, as Markdown: cells a variant of RankDyna ran in its own folder, each set beside
the campaign's dense, RankDyna and FWSVD runs and the task's floor; and average retention per method for one seed or
a subset of tasks. Reads run files only (scripts/benchmark_glue.py writes them); trains nothing.

    python scripts/glue_controls.py --variant "warm-up 0.3=benchmarks/glue_schedule_warmup" \\
        --variant "warm-up 0.5=benchmarks/glue_schedule_warmup0.5" \\
        --variant "final 0.5=benchmarks/glue_schedule_control"
    python scripts/glue_controls.py --method rankdyna_equal --variant "final 0.4=benchmarks/glue_equal_final0.4"
    python scripts/glue_controls.py --retention_seed 42
    python scripts/glue_controls.py --retention_tasks sst2 mrpc cola
    python scripts/glue_controls.py --headline          # the README's table: floor, dense, RankDyna, FWSVD
    python scripts/glue_controls.py --side_by_side benchmarks/glue_side_by_side benchmarks/glue_side_by_side_dense_after
    python scripts/glue_controls.py --schedule_cost benchmarks/glue_step_trace/cola/rankdyna_b0.2_seed42.json \
        benchmarks/glue_step_trace/cola/dense_bna_seed42.json
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rankdyna_trainer.experiment import glue_cost, glue_plan, glue_report  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--campaign", default=os.path.join(REPO, "benchmarks", "glue_protocol"))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FOLDER",
                        help="a column: the run files under FOLDER, headed NAME (repeatable)")
    parser.add_argument("--method", default="rankdyna", choices=["rankdyna", *glue_plan.EQUAL_WORK],
                        help="--variant: the row the variants' runs are set beside (and the only runs they show)")
    parser.add_argument("--retention_seed", type=int, default=None, help="average retention from this seed's runs")
    parser.add_argument("--retention_tasks", nargs="+", default=None, choices=glue_report.TASK_ORDER,
                        help="average retention over these tasks only (means over seeds)")
    parser.add_argument("--headline", action="store_true",
                        help="the README's table: the floor, dense, and per budget RankDyna (one round and FWSVD's "
                        "steps in one run) and FWSVD, mean score per task and average retention")
    parser.add_argument("--side_by_side", nargs="+", default=[], metavar="FOLDER",
                        help="runs made one after the other (dense, RankDyna, dense again): their wall time over the "
                        "same window's dense runs, and where each step's time went")
    parser.add_argument("--schedule_cost", nargs=2, default=None, metavar=("RANKDYNA_RUN", "DENSE_RUN"),
                        help="a RankDyna run file's step times per part of its schedule, over a dense run's same steps")
    args = parser.parse_args(argv)
    for variant in args.variant:
        if "=" not in variant or not variant.partition("=")[0]:
            parser.error(f"--variant takes NAME=FOLDER, got {variant!r}")
    for folder in [args.campaign] + [v.partition("=")[2] for v in args.variant] + args.side_by_side:
        if not os.path.isdir(folder):
            parser.error(f"no run folder {folder!r}")
    for path in args.schedule_cost or []:
        if not os.path.isfile(path):
            parser.error(f"--schedule_cost: no run file {path!r}")
    if not (args.variant or args.side_by_side or args.headline or args.schedule_cost) and args.retention_seed is None \
            and args.retention_tasks is None:
        parser.error("nothing to print: give --variant, --retention_seed, --retention_tasks, --headline, "
                     "--side_by_side or --schedule_cost")
    return args


def main(argv=None):
    args = parse_args(argv)
    campaign = glue_report.read_run_files(args.campaign)
    if args.schedule_cost:
        import json

        runs = []
        for path in args.schedule_cost:
            with open(path) as f:
                runs.append(json.load(f))
        run, dense = runs
        if "every_step_ms" not in run.get("step_cost", {}) or "every_step_ms" not in dense.get("step_cost", {}):
            sys.exit("glue_controls.py: --schedule_cost needs run files with step_cost.every_step_ms (written since "
                     "2026-12-06 17:40)")
        print("\n".join(glue_cost.schedule_cost_table(run, dense)) + "\n")
    if args.side_by_side:
        runs = [run for folder in args.side_by_side for run in glue_report.read_run_files(folder)]
        print("\n".join(glue_cost.side_by_side_table(runs)) + "\n")
        print("\n".join(glue_cost.side_by_side_summary(runs)) + "\n")
    if args.headline:
        print("\n".join(glue_report.headline_table(glue_report.summarize(campaign))) + "\n")
    if args.variant:
        variants = {name: glue_report.read_run_files(folder)
                    for name, _, folder in (v.partition("=") for v in args.variant)}
        print("\n".join(glue_report.control_table(campaign, variants, method=args.method)) + "\n")
    if args.retention_seed is not None or args.retention_tasks is not None:
        averages = glue_report.average_retention(campaign, args.retention_seed, args.retention_tasks)
        print("| method@budget | average retention |\n|---|---|")
        print("\n".join(f"| {key} | {100 * value:.1f} % |" for key, value in averages.items()))


if __name__ == "__main__":
    main()
