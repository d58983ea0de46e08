"""Issue 28's comparison on the GLUE page: RankDyna against FWSVD at equal steps and at one round, from the files.

Two RankDyna rows meet FWSVD at every budget: ``rankdyna`` (one protocol round) and ``rankdyna_equal`` (the same
run with FWSVD's two rounds of optimizer steps, ``glue_plan.EQUAL_WORK``). Each comparison is paired by seed (a seed
fixes the data order and the head's initialization of both runs), per task, then averaged over the tasks that
decide in retention points: per task the mean paired score difference over dense's mean score, x100. With every
seed paired this is the difference of the two rows' average retention.

A task decides only when dense clears its constant-prediction floor by :data:`DECISIVE_MARGIN` points on the mean
of its seeds; below that a method's difference there is mostly noise, so the task is reported apart with its numbers
and left out of the averages and target counts (the all-task average stays on the page, labelled). Nothing is
averaged over a missing cell: a lead or target needs a paired seed on every task that decides, and a target is met
or not met only with :data:`REQUIRED_PAIRS` paired seeds on each of those tasks (else "not yet measured", with the
counts).
"""

from __future__ import annotations

import math
import statistics

from .glue_plan import fwsvd_steps, round_steps
from .glue_report import DECISIVE_MARGIN, TASK_ORDER, run_key, split_key
from .seed_noise import inside_noise, noise_text

REQUIRED_PAIRS = 3  # seeds both rows ran, per task, before a target is decided
AGAINST = "fwsvd"
EQUAL, ONE_ROUND = "rankdyna_equal", "rankdyna"
NAMES = {EQUAL: "at equal steps", ONE_ROUND: "at one round"}
# Issue 28's targets: the equal-steps row's average retention per budget, the budgets where it must lead on most
# tasks (the "3 of 4", taken as that share of the tasks that decide), and the one-round row's budget.
RETENTION_TARGETS = {0.5: 0.99, 0.33: 0.97, 0.2: 0.93}
MOST_TASKS_AT = (0.33, 0.2)
MOST_TASKS_SHARE = 3 / 4
ONE_ROUND_AHEAD_AT = 0.2


def dense_margins(summary: dict) -> dict[str, float]:
    """Per task with a dense row: dense's mean score minus the task's floor (points)."""
    dense = summary["runs"].get("dense@1.0", {})
    return {t: dense[t]["mean"] - summary["majority"][t] for t in summary["majority"] if t in dense}


def tasks_apart(summary: dict) -> dict[str, str]:
    """The tasks reported apart (dense less than DECISIVE_MARGIN above the floor), each with the reason."""
    dense = summary["runs"].get("dense@1.0", {})
    return {t: (f"dense {dense[t]['mean']:.1f} (mean of {dense[t]['n']} seeds) is {margin:.1f} points above the "
                f"floor {summary['majority'][t]:.1f}, less than {DECISIVE_MARGIN:g}")
            for t, margin in dense_margins(summary).items() if margin < DECISIVE_MARGIN}


def deciding_tasks(summary: dict) -> list[str]:
    """The tasks whose dense mean clears the floor by DECISIVE_MARGIN, in the page's order."""
    return [t for t in TASK_ORDER if dense_margins(summary).get(t, -math.inf) >= DECISIVE_MARGIN]


def undecided_tasks(summary: dict) -> list[str]:
    """The campaign's tasks without a dense row: whether they decide is not known yet."""
    return [t for t in TASK_ORDER if t not in dense_margins(summary)]


def paired_scores(records: list[dict], method: str, budget: float, against: str = AGAINST) -> dict[str, list[float]]:
    """Per task, ``method``'s score minus ``against``'s at ``budget`` for each seed both ran (points)."""
    scores = {(run_key(r), r["task"], r["seed"]): r["score"] for r in records}
    gaps: dict[str, list[float]] = {}
    for (key, task, seed), score in sorted(scores.items(), key=lambda item: (item[0][1], item[0][2])):
        _, variant, b = split_key(key)
        other = scores.get((f"{against}@{budget:g}", task, seed))
        if variant == method and b == budget and other is not None:
            gaps.setdefault(task, []).append(score - other)
    return gaps


def lead(records: list[dict], summary: dict, method: str, budget: float, tasks: list[str]) -> dict:
    """``method`` against FWSVD at ``budget`` over ``tasks``: per task the paired differences (points) and their
    mean as retention points; the average over ``tasks`` (None unless every task has a pair), how many tasks it
    is ahead on, and whether every task has REQUIRED_PAIRS pairs."""
    dense = summary["runs"].get("dense@1.0", {})
    gaps = paired_scores(records, method, budget)
    per_task = {t: 100 * statistics.fmean(gaps[t]) / dense[t]["mean"] for t in tasks
                if gaps.get(t) and dense.get(t, {}).get("mean")}
    return {"pairs": {t: len(gaps.get(t, [])) for t in tasks}, "points": per_task,
            "gaps": {t: gaps.get(t, []) for t in tasks},
            "average": statistics.fmean(per_task.values()) if tasks and set(per_task) == set(tasks) else None,
            "ahead": [t for t in tasks if per_task.get(t, 0) > 0],
            "complete": bool(tasks) and all(len(gaps.get(t, [])) >= REQUIRED_PAIRS for t in tasks)}


def average_retention(summary: dict, key: str, tasks: list[str]) -> tuple[float | None, bool]:
    """``key``'s mean score over dense's, averaged over ``tasks`` (None unless every task has the row), and whether
    every one of those cells has REQUIRED_PAIRS seeds."""
    row, dense = summary["runs"].get(key, {}), summary["runs"].get("dense@1.0", {})
    if not tasks or any(t not in row or not dense.get(t, {}).get("mean") for t in tasks):
        return None, False
    kept = statistics.fmean(row[t]["mean"] / dense[t]["mean"] for t in tasks)
    return kept, all(row[t]["n"] >= REQUIRED_PAIRS and dense[t]["n"] >= REQUIRED_PAIRS for t in tasks)


def _pairs_text(result: dict) -> str:
    return "pairs " + "/".join(str(n) for n in result["pairs"].values())


def lead_cell(result: dict) -> str:
    """``**FWSVD** by 1.2 (pairs 3/3/3)``: who leads and by how many retention points; missing when a task has no
    pair; provisional when a task has fewer than REQUIRED_PAIRS."""
    if result["average"] is None:
        return f"missing ({_pairs_text(result)})"
    who = "RankDyna" if result["average"] > 0 else "FWSVD"
    note = "" if result["complete"] else ", provisional"
    return f"**{who}** by {abs(result['average']):.1f} ({_pairs_text(result)}{note})"


def _tasks_behind(result: dict) -> list[str]:
    """The measured tasks a lead is not ahead on."""
    return [t for t, points in result["points"].items() if points <= 0]


def _behind_text(result: dict) -> str:
    """The measured tasks a lead is not ahead on, with the paired score differences per seed and whether they are
    inside the seeds' noise: why a per-task target fails (``; behind on MRPC by 0.2: +1.2 / -2.0 / +0.4 by seed,
    lowest first (ahead on 2 of 3 seeds; mean -0.1 ± 1.0 standard error: inside the seeds' noise)``)."""
    return "".join(f"; behind on {t.upper()} by {-result['points'][t]:.1f}: "
                   + " / ".join(f"{g:+.1f}" for g in result["gaps"][t])
                   + f" by seed, lowest first (ahead on {sum(g > 0 for g in result['gaps'][t])} of "
                   f"{len(result['gaps'][t])} seeds; {noise_text(result['gaps'][t])})" for t in _tasks_behind(result))


def _noise_reason(results: list[dict], decided: list[bool | None]) -> str:
    """The reason a failed per-task target fails when every task behind is inside the seeds' noise: level, not
    measured behind (empty otherwise)."""
    behind = [r["gaps"][t] for r in results for t in _tasks_behind(r)]
    if False not in decided or not behind or not all(inside_noise(g) for g in behind):
        return ""
    return (": every task behind is inside the seeds' noise (its mean paired difference within two standard errors "
            "of zero), so on these seeds those tasks are level with FWSVD, not measured behind or ahead")


def _verdict(decided: list[bool | None]) -> str:
    """Met when every part is decided and holds, not met as soon as a decided part fails, else not yet measured."""
    if any(d is False for d in decided):
        return "**not met**"
    return "**met**" if decided and all(d is True for d in decided) else "**not yet measured**"


def _n_cells(summary: dict, method: str, budgets, tasks: list[str]) -> str:
    runs = summary["runs"]

    def n(key, t):
        return runs.get(key, {}).get(t, {}).get("n", 0)

    return "; ".join(f"{b:g}: " + ", ".join(f"{t.upper()} {n(f'{method}@{b:g}', t)}/{n(f'{AGAINST}@{b:g}', t)}"
                                             for t in tasks) for b in budgets)


def target_statements(records: list[dict], summary: dict) -> list[str]:
    """Issue 28's targets, each met / not met / not yet measured, over the tasks that decide, with the seeds per
    cell (``method n / FWSVD n``) and the measured numbers."""
    tasks = deciding_tasks(summary)
    waiting = undecided_tasks(summary)
    budgets = list(RETENTION_TARGETS)
    leads = {(m, b): lead(records, summary, m, b, tasks) for m in (EQUAL, ONE_ROUND) for b in budgets}

    def decided_lead(result, holds):
        return holds(result) if result["complete"] and not waiting else None

    def shown(result):
        return f"{result['average']:+.1f}" if result["average"] is not None else "missing"

    over = ", ".join(t.upper() for t in tasks) or "no task yet"
    unknown = (f"; dense is missing on {', '.join(t.upper() for t in waiting)}, so which tasks decide is not known "
               "yet" if waiting else "")
    lines = [f"Issue 28's targets, over the tasks that decide ({over}; averages in retention points, RankDyna minus "
             f"FWSVD, paired by seed). Each is decided only with {REQUIRED_PAIRS} paired seeds on every such task "
             f"(n below: RankDyna row / FWSVD per cell){unknown}:", ""]

    every = [decided_lead(leads[EQUAL, b], lambda r: r["average"] > 0) for b in budgets]
    lines.append(f"- At equal steps, ahead of FWSVD at every budget: {_verdict(every)} ("
                 + ", ".join(f"{b:g}: {shown(leads[EQUAL, b])}" for b in budgets)
                 + f"; n {_n_cells(summary, EQUAL, budgets, tasks)}).")

    need = math.ceil(MOST_TASKS_SHARE * len(tasks))
    most = [decided_lead(leads[EQUAL, b], lambda r: len(r["ahead"]) >= need) for b in MOST_TASKS_AT]
    lines.append(f"- At equal steps, ahead on at least 3 of 4 tasks at {' and '.join(f'{b:g}' for b in MOST_TASKS_AT)}"
                 f" (here {need} of the {len(tasks)} that decide): {_verdict(most)} ("
                 + ", ".join(f"{b:g}: ahead on {len(leads[EQUAL, b]['ahead'])} of "
                             f"{sum(n > 0 for n in leads[EQUAL, b]['pairs'].values())} measured"
                             + _behind_text(leads[EQUAL, b]) for b in MOST_TASKS_AT)
                 + ")" + _noise_reason([leads[EQUAL, b] for b in MOST_TASKS_AT], most) + ".")

    low, high = leads[EQUAL, 0.2], leads[EQUAL, 0.5]
    grows = (low["average"] > high["average"] if low["complete"] and high["complete"] and not waiting else None)
    lines.append(f"- At equal steps, lead at 0.2 larger than at 0.5: {_verdict([grows])} (0.2: {shown(low)}, 0.5: "
                 f"{shown(high)}).")

    kept, retained = [], []
    for budget, target in RETENTION_TARGETS.items():
        value, complete = average_retention(summary, f"{EQUAL}@{budget:g}", tasks)
        kept.append(value >= target if value is not None and complete and not waiting else None)
        retained.append(f"{budget:g}: " + (f"{100 * value:.1f} %" if value is not None else "missing")
                        + f" of {100 * target:g} %")
    lines.append("- At equal steps, retention at least "
                 + " / ".join(f"{100 * t:g} %" for t in RETENTION_TARGETS.values()) + " at "
                 + " / ".join(f"{b:g}" for b in RETENTION_TARGETS) + f": {_verdict(kept)} ({'; '.join(retained)}).")

    one = leads[ONE_ROUND, ONE_ROUND_AHEAD_AT]
    lines.append(f"- At one round, ahead of FWSVD at {ONE_ROUND_AHEAD_AT:g}: "
                 f"{_verdict([decided_lead(one, lambda r: r['average'] > 0)])} ({shown(one)}; n "
                 f"{_n_cells(summary, ONE_ROUND, [ONE_ROUND_AHEAD_AT], tasks)}).")
    lines.append("- SmolLM2 table, the default `RankDynaConfig()` row at least as good as the decoder recipe's row: "
                 "stated per budget on [RESULTS_LM.md](RESULTS_LM.md#against-issue-28s-target), from its run files.")
    return lines + [""]


def leader_table(records: list[dict], summary: dict, times_dense: dict[str, float]) -> list[str]:
    """Per budget, who leads at equal steps and at one round over the tasks that decide, the same over every task
    (labelled), and each row's wall time over dense's."""
    tasks, every = deciding_tasks(summary), [t for t in TASK_ORDER if t in summary["majority"]]
    budgets = sorted({split_key(k)[2] for k in summary["runs"] if split_key(k)[0] == AGAINST}
                     | set(RETENTION_TARGETS), reverse=True)
    decide = ", ".join(t.upper() for t in tasks) or "none yet"
    lines = [f"Who leads, per budget: the average over the tasks that decide ({decide}) and, labelled, over all "
             f"{len(every)} tasks, of RankDyna's paired lead over FWSVD in retention points (pairs: seeds both ran, "
             "per task). `× dense` is each row's wall time over the dense run of the same task and seed (the "
             "wall-time table below).", "",
             "| budget | at equal steps | at equal steps, all tasks | at one round | at one round, all tasks "
             "| × dense: rankdyna / rankdyna_equal / fwsvd |", "|---|---|---|---|---|---|"]
    for b in budgets:
        cells = [lead_cell(lead(records, summary, m, b, ts)) for m in (EQUAL, ONE_ROUND) for ts in (tasks, every)]
        ratios = " / ".join(f"{times_dense[k]:.2f}" if (k := f"{m}@{b:g}") in times_dense else "—"
                            for m in (ONE_ROUND, EQUAL, AGAINST))
        lines.append(f"| {b:g} | " + " | ".join(cells) + f" | {ratios} |")
    return lines + [""]


def steps_table(records: list[dict]) -> list[str]:
    """Optimizer steps per task: one protocol round (rankdyna), FWSVD's dense round plus its own round, both from
    the protocol in the run files, and what the rankdyna_equal runs recorded."""
    protocols, recorded = {}, {}
    for r in records:
        protocols.setdefault(r["task"], r["protocol"])
        if r["method"] == EQUAL and r.get("optimizer_steps") is not None:
            recorded.setdefault(r["task"], set()).add(r["optimizer_steps"])
    if not protocols:
        return []
    lines = ["Optimizer steps of one run (batches per epoch as the Trainer counts them; FWSVD's run is its dense "
             "round plus its own second round, both the protocol's epochs; `rankdyna_equal` trains twice the "
             "protocol's epochs in one run and records its steps):", "",
             "| task | protocol epochs | rankdyna (one round) | fwsvd (dense round + own round) "
             "| rankdyna_equal (recorded) |", "|---|---|---|---|---|"]
    for task in [t for t in TASK_ORDER if t in protocols]:
        p = protocols[task]
        one = round_steps(p["train_rows_used"], p["batch_size"], p["epochs"])
        two = fwsvd_steps(p)
        seen = recorded.get(task)
        cell = "no run yet" if not seen else ", ".join(str(s) for s in sorted(seen))
        if seen and seen != {two}:
            cell += " (**not FWSVD's**)"
        lines.append(f"| {task.upper()} | {p['epochs']:g} | {one} | {one} + {one} = {two} | {cell} |")
    return lines + [""]


def apart_lines(records: list[dict], summary: dict) -> list[str]:
    """The tasks reported apart: the reason with its numbers, and their RankDyna and FWSVD cells per budget."""
    apart = tasks_apart(summary)
    if not apart:
        return []
    runs = summary["runs"]
    lines = []
    for task, reason in apart.items():
        lines += [f"**Reported apart: {task.upper()}.** Its {reason}: a method's difference there is mostly noise, so "
                  "it is left out of the averages and target counts above (the all-task columns include it). Its "
                  "rows (mean over seeds, n; paired differences: mean points, seeds ahead / paired):", "",
                  "| budget | rankdyna | rankdyna_equal | fwsvd | rankdyna − fwsvd | rankdyna_equal − fwsvd |",
                  "|---|---|---|---|---|---|"]
        budgets = sorted({split_key(k)[2] for k in runs if task in runs[k]} - {1.0}, reverse=True)
        for b in budgets:
            cells = [runs.get(f"{m}@{b:g}", {}).get(task) for m in (ONE_ROUND, EQUAL, AGAINST)]
            text = [f"{c['mean']:.1f} (n={c['n']})" if c else "missing" for c in cells]
            for m in (ONE_ROUND, EQUAL):
                d = paired_scores(records, m, b).get(task)
                text.append(f"{statistics.fmean(d):+.1f} ({sum(x > 0 for x in d)}/{len(d)})" if d else "missing")
            lines.append(f"| {b:g} | " + " | ".join(text) + " |")
        lines.append("")
    return lines


def config_mismatches(records: list[dict]) -> list[str]:
    """rankdyna_equal runs whose RankDyna config differs from the rankdyna run of the same cell and seed (the two
    rows must differ in their steps alone; the defaults change under the campaign)."""
    one = {(r["task"], r["budget"], r["seed"], r.get("rank_multiple", 1)): r for r in records
           if r["method"] == ONE_ROUND}
    lines = []
    for r in records:
        twin = one.get((r["task"], r["budget"], r["seed"], r.get("rank_multiple", 1))) if r["method"] == EQUAL else None
        if twin is None:
            continue
        a, b = twin.get("config") or {}, r.get("config") or {}
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if differ:
            changes = ", ".join(f"{k}: {b.get(k)} against {a.get(k)}" for k in differ)
            lines.append(f"`{r.get('file', r['task'])}` ({changes})")
    return lines


def unpaired_runs(records: list[dict]) -> list[str]:
    """RankDyna runs (either row) without the FWSVD run of the same task, budget and seed, and FWSVD runs without
    one of each RankDyna row: the comparisons leave them out."""
    have = {(run_key(r), r["task"], r["seed"]) for r in records}
    cells = {(key, task) for key, task, _ in have}
    order = sorted(have, key=lambda k: (k[0], TASK_ORDER.index(k[1]) if k[1] in TASK_ORDER else len(TASK_ORDER), k[2]))
    lines = []
    for method in (ONE_ROUND, EQUAL):
        for key, task, seed in order:
            _, variant, budget = split_key(key)
            ours, theirs = f"{method}@{budget:g}", f"{AGAINST}@{budget:g}"
            if variant == method and (theirs, task, seed) not in have:
                lines.append(f"`{key}` {task.upper()} seed {seed} has no `{theirs}` run to pair with")
            # an FWSVD seed the RankDyna row lacks, where that row has begun the cell
            if variant == AGAINST and (ours, task) in cells and (ours, task, seed) not in have:
                lines.append(f"`{key}` {task.upper()} seed {seed} has no `{ours}` run to pair with")
    return lines


def section(records: list[dict], summary: dict, times_dense: dict[str, float]) -> list[str]:
    """The page's issue-28 block: the task rule, the targets, who leads per budget, the steps, the tasks apart."""
    apart = tasks_apart(summary)
    rule = (f"A task decides only when dense clears its floor by {DECISIVE_MARGIN:g} points on the mean of its seeds "
            "(computed from the run files); "
            + ("every task does." if not apart else
               "; ".join(f"{t.upper()} does not: {why}" for t, why in apart.items()) + ", so it is reported apart."))
    lines = ["### Equal steps and one round against FWSVD (issue 28)", "",
             "`rankdyna_equal` is the `rankdyna` run (same config, seeds, dev sets and floors) trained for as many "
             "optimizer steps as FWSVD's two rounds together; `rankdyna` is one protocol round. " + rule, ""]
    lines += target_statements(records, summary)
    lines += leader_table(records, summary, times_dense)
    lines += steps_table(records)
    mismatched = config_mismatches(records)
    if mismatched:
        lines += ["**Warning:** these `rankdyna_equal` runs used another config than the `rankdyna` run of the same "
                  "cell and seed, so the two rows differ in more than their steps: " + "; ".join(mismatched) + ".", ""]
    lines += apart_lines(records, summary)
    return lines
