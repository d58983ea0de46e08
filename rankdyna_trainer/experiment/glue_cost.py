"""What campaign runs cost against dense, when they ran side by side: one window of the machine, one table.

The campaign's own ``x dense`` column pairs runs made hours or sessions apart, on a machine whose speed drifts by
about 9 % within hours (docs/cost.md); runs made one after the other (dense, then RankDyna at each budget, then dense
again) compare on the same clock. Reads run files only (``scripts/benchmark_glue.py`` writes them).
"""

from __future__ import annotations

import statistics

from .glue_report import TASK_ORDER

PHASES = ("start", "middle", "end")


def _phases_ms(parts: dict | None) -> str:
    if not parts or any(p not in parts for p in PHASES):
        return ""
    return " / ".join(f"{1000 * parts[p]:.0f}" for p in PHASES)


def side_by_side_table(runs: list[dict]) -> list[str]:
    """Markdown rows, per task and seed in the order the runs finished: score, wall time, time over the mean of the
    dense runs of the same task and seed among ``runs``, median optimizer-step time at the start / middle / end of
    the run (RankDyna: warm-up, pruning, at the target) and its forward-and-backward part, RankDyna's own hook
    time and the training's peak RSS (``step_cost`` of the run file). A task and seed without a dense run gets no
    ratio."""
    dense = {}
    for run in runs:
        if run["method"] == "dense":
            dense.setdefault((run["task"], run["seed"]), []).append(run["wall_time"]["total_s"])
    rows = ["| task | seed | run | finished (UTC) | score | wall (s) | x dense | step start / middle / end (ms) | "
            "forward + backward (ms) | RankDyna's hook (s) | peak RSS (MiB) |", "|---|" + "---|" * 10]
    order = sorted(runs, key=lambda r: (TASK_ORDER.index(r["task"]), r["seed"], r["finished"]))
    for run in order:
        clocks = dense.get((run["task"], run["seed"]))
        total = run["wall_time"]["total_s"]
        ratio = f"{total / statistics.fmean(clocks):.2f}" if clocks else ""
        cost = run.get("step_cost") or {}
        name = run["method"] if run.get("budget") is None else f"{run['method']} {run['budget']:g}"
        hook = f"{cost['rankdyna_hook_total_s']:.1f}" if cost.get("rankdyna_hook_total_s") else ""
        peak = f"{cost['peak_rss_mib']:.0f}" if cost.get("peak_rss_mib") else ""
        rows.append(f"| {run['task'].upper()} | {run['seed']} | {name} | {run['finished'][11:16]} | "
                    f"{run['score']:.1f} | {total:.0f} | {ratio} | {_phases_ms(cost.get('step_s'))} | "
                    f"{_phases_ms((cost.get('step_part_s') or {}).get('forward_backward'))} | {hook} | {peak} |")
    return rows


def side_by_side_summary(runs: list[dict], budgets=(0.5, 0.33, 0.2)) -> list[str]:
    """Markdown rows, one per task: a one-round RankDyna run's wall time over the mean of the dense runs of its task
    and seed among ``runs``, per budget and seed (seeds in the order ``42 / 1 / 2`` of the campaign, then any
    other) with the mean over seeds in bold, and the dense runs' seconds. A cell without both runs is ``·``."""
    dense: dict[tuple[str, int], list[float]] = {}
    ours: dict[tuple[str, float, int], float] = {}
    for run in runs:
        total = run["wall_time"]["total_s"]
        if run["method"] == "dense":
            dense.setdefault((run["task"], run["seed"]), []).append(total)
        elif run["method"] == "rankdyna" and run.get("budget") in budgets:
            ours[(run["task"], run["budget"], run["seed"])] = total
    seeds = sorted({seed for _, seed in dense} | {seed for *_, seed in ours}, key=lambda s: (s != 42, s))
    tasks = [t for t in TASK_ORDER if any(k[0] == t for k in ours)]
    rows = ["| task | " + " | ".join(f"RankDyna / dense at {b:g}" for b in budgets)
            + " | dense (s), seeds " + " / ".join(map(str, seeds)) + " |", "|---|" + "---|" * (len(budgets) + 1)]
    for task in tasks:
        cells = []
        for budget in budgets:
            ratios = [ours[(task, budget, s)] / statistics.fmean(dense[(task, s)])
                      if (task, budget, s) in ours and (task, s) in dense else None for s in seeds]
            known = [r for r in ratios if r is not None]
            cells.append(" / ".join("·" if r is None else f"{r:.2f}" for r in ratios)
                         + (f" (**{statistics.fmean(known):.2f}**)" if known else ""))
        clocks = " / ".join(f"{statistics.fmean(dense[(task, s)]):.0f}" if (task, s) in dense else "·" for s in seeds)
        rows.append(f"| {task.upper()} | " + " | ".join(cells) + f" | {clocks} |")
    return rows


def schedule_parts(run: dict) -> dict[str, list[int]]:
    """A RankDyna run's optimizer steps by what its schedule does on them (from the run file's resolved config):
    warm-up before the scores start, warm-up scoring, reallocation steps (every group runs), the other pruning
    steps (kept groups only, scored), and the last part at the target."""
    from ..budget import ParameterBudget
    from ..methods.rankdyna.importance import memory_steps

    config, total = run["config"], run["optimizer_steps"]
    budget = ParameterBudget.from_fractions(1, 1.0, run["budget"], total, config["warmup_fraction"],
                                            config["final_fraction"], config["reallocation_interval"]
                                            ).scoring_from(memory_steps(config["beta1"], config["beta2"]))
    parts = {"warm-up, unscored": [], "warm-up, scored": [], "reallocation steps": [], "pruning, kept groups": [],
             "at the target": []}
    for step in range(total):
        if step < budget.warmup_steps:
            parts["warm-up, scored" if budget.tracks_scores(step) else "warm-up, unscored"].append(step)
        elif budget.is_reallocation_step(step):
            parts["reallocation steps"].append(step)
        elif step < budget.final_start:
            parts["pruning, kept groups"].append(step)
        else:
            parts["at the target"].append(step)
    return parts


def schedule_cost_table(run: dict, dense: dict) -> list[str]:
    """Markdown rows: per part of a RankDyna run's schedule (:func:`schedule_parts`), its steps, and their time over
    the same steps of a dense run of the same task and seed (both files need ``step_cost.every_step_ms``; the same
    seed gives both runs the same batches, step for step)."""
    steps, dense_steps = run["step_cost"]["every_step_ms"], dense["step_cost"]["every_step_ms"]
    if len(steps) != len(dense_steps):
        raise ValueError(f"the runs have {len(steps)} and {len(dense_steps)} steps: not the same batches")
    rows = ["| part of the schedule | steps | time (s) | dense, same steps (s) | of dense |", "|---|---|---|---|---|"]
    for part, indices in [*schedule_parts(run).items(), ("whole run", list(range(len(steps))))]:
        mine, theirs = sum(steps[i] for i in indices) / 1000, sum(dense_steps[i] for i in indices) / 1000
        ratio = f"{mine / theirs:.2f}" if theirs else ""
        rows.append(f"| {part} | {len(indices)} | {mine:.1f} | {theirs:.1f} | {ratio} |")
    return rows
