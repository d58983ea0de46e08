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
    the run (RankDyna: warm-up, pruning, at the target) and its forward-and-backward part, and RankDyna's own hook
    time (``step_cost`` of the run file). A task and seed without a dense run gets no ratio."""
    dense = {}
    for run in runs:
        if run["method"] == "dense":
            dense.setdefault((run["task"], run["seed"]), []).append(run["wall_time"]["total_s"])
    rows = ["| task | seed | run | finished (UTC) | score | wall (s) | x dense | step start / middle / end (ms) | "
            "forward + backward (ms) | RankDyna's hook (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(runs, key=lambda r: (TASK_ORDER.index(r["task"]), r["seed"], r["finished"]))
    for run in order:
        clocks = dense.get((run["task"], run["seed"]))
        total = run["wall_time"]["total_s"]
        ratio = f"{total / statistics.fmean(clocks):.2f}" if clocks else ""
        cost = run.get("step_cost") or {}
        name = run["method"] if run.get("budget") is None else f"{run['method']} {run['budget']:g}"
        hook = f"{cost['rankdyna_hook_total_s']:.1f}" if cost.get("rankdyna_hook_total_s") else ""
        rows.append(f"| {run['task'].upper()} | {run['seed']} | {name} | {run['finished'][11:16]} | "
                    f"{run['score']:.1f} | {total:.0f} | {ratio} | {_phases_ms(cost.get('step_s'))} | "
                    f"{_phases_ms((cost.get('step_part_s') or {}).get('forward_backward'))} | {hook} |")
    return rows
