"""The GLUE benchmark's summary and page, built from its run files alone.

``scripts/benchmark_glue.py`` writes one JSON per (task, method, budget, seed) run. :func:`summarize` turns a list of
those records into the summary ``{"majority": {task: x}, "runs": {"method@budget": {task: {"mean", "std", "n"}}}}``
(scores x100, dense as ``dense@1.0``); :func:`render_report` writes the Markdown page and :func:`plot_retention` its
plot from that summary, plus the run files for what the summary does not hold (wall time, the protocol, the
commands) and the optional latency and CPU-cost files. Nothing here trains or loads a model, so the page can be
regenerated anywhere from the committed files.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict

from .cpu_share import shared_machine
from .glue_plan import TAKES_FFN_GROUPS, UNCOMPRESSED

TASK_ORDER = ["sst2", "mrpc", "cola", "rte"]
METHOD_ORDER = ["dense", "rankdyna", "rankdyna_equal", "fwsvd", "svd", "tfwsvd", "ars", "adalora"]
# What the issues ask for before the benchmark counts as done: seeds per method at every budget.
REQUIRED_SEEDS = {"dense": 3, "rankdyna": 3, "rankdyna_equal": 3, "fwsvd": 3}
FLOOR_MARGIN = 1.0  # a compressed model's mean this close to the constant prediction has learned little
# Dense's mean must clear a task's floor by this many points for the task to decide a comparison: below it, a
# difference between methods there is mostly noise, and the targets report the task apart (glue_targets).
DECISIVE_MARGIN = 3.0
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "mcc": "Matthews corr."}


def run_key(record: dict) -> str:
    """``method@budget`` (``+m8`` after the method when ranks were kept in multiples of 8, ``+singular`` for RankDyna
    with singular groups in the FFNs instead of the intermediate channels of the campaign's recipe, ``rankdyna_equal``
    likewise; records from before the ``ffn_groups`` field are singular; ``+attn_singular`` for RankDyna with singular
    groups in the attention instead of the per-head channels of the library's default, records from before the
    ``attention_groups`` field included); dense and AdaLoRA, which export uncompressed models, are ``@1.0``."""
    method = record["method"]
    multiple = record.get("rank_multiple") or 1
    if multiple > 1:
        method = f"{method}+m{multiple}"
    if record["method"] in TAKES_FFN_GROUPS and (record.get("config") or {}).get("ffn_groups",
                                                                                  "singular") == "singular":
        method = f"{method}+singular"
    if record["method"] in TAKES_FFN_GROUPS and (record.get("config") or {}).get("attention_groups",
                                                                                  "singular") == "singular":
        method = f"{method}+attn_singular"
    budget = 1.0 if record["method"] in UNCOMPRESSED else record["budget"]
    return f"{method}@{budget:g}" if budget != 1.0 else f"{method}@1.0"


def split_key(key: str) -> tuple[str, str, float]:
    """``"rankdyna+m8@0.33"`` -> ``("rankdyna", "rankdyna+m8", 0.33)``."""
    variant, _, budget = key.partition("@")
    return variant.split("+")[0], variant, float(budget)


def read_run_files(results_dir: str) -> list[dict]:
    """Every run record under ``results_dir`` (one JSON per run; files without a ``method`` are skipped), each with
    its path relative to ``results_dir`` under ``"file"`` (the name ``notes.json`` uses)."""
    records = []
    for root, _, files in sorted(os.walk(results_dir)):
        for name in sorted(files):
            if not name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            with open(path) as f:
                record = json.load(f)
            if isinstance(record, dict) and "method" in record and "score" in record:
                record["file"] = os.path.relpath(path, results_dir).replace(os.sep, "/")
                records.append(record)
    return records


def wall_time_unusable(notes: dict[str, str] | None) -> set[str]:
    """Run files whose note starts with "wall time": their score stands, but their clock shared the machine or
    was paused, so the wall-time table leaves them out."""
    return {name for name, text in (notes or {}).items() if text.lower().startswith("wall time")}


def clock_unusable(records: list[dict], notes: dict[str, str] | None) -> set[str]:
    """Run files the wall-time table leaves out: those ``wall_time_unusable`` names, and the post-hoc runs of the
    same task and seed as such a dense run whose ``first_round_s`` is that run's clock (the benchmark copies it from
    the dense run file; a run that trained its dense round again, its saved model gone, has its own clock)."""
    noted = wall_time_unusable(notes)
    bad_clock = {(r["task"], r["seed"]): r["wall_time"]["fine_tune_s"] for r in records
                 if r["method"] == "dense" and r.get("file") in noted}
    inherited = {r.get("file") for r in records if "first_round_s" in r["wall_time"]
                 and bad_clock.get((r["task"], r["seed"])) == r["wall_time"]["first_round_s"]}
    return noted | inherited | shared_cores(records)


def shared_cores(records: list[dict]) -> set[str]:
    """Run files whose measured CPU share (``cpu_share``, written since issue 25's campaign) says another job used
    the cores during the run: the clock is left out the same way a noted one is."""
    return {r.get("file") for r in records if shared_machine(r.get("cpu_share"))}


def summarize(records: list[dict]) -> dict:
    """The summary of ``records``: per ``method@budget`` and task the mean, sample standard deviation (0 for a
    single run) and number of seeds of the task's score (x100), and each task's constant-prediction floor."""
    scores = defaultdict(lambda: defaultdict(list))
    majority = {}
    for r in records:
        scores[run_key(r)][r["task"]].append(r["score"])
        majority[r["task"]] = r["floor"]["score"]
    runs = {}
    for key in sorted(scores, key=_key_order):
        runs[key] = {}
        for task in _ordered_tasks(scores[key]):
            values = scores[key][task]
            runs[key][task] = {"mean": round(statistics.fmean(values), 4),
                               "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                               "n": len(values)}
    return {"majority": {t: round(majority[t], 4) for t in _ordered_tasks(majority)}, "runs": runs}


def _ordered_tasks(tasks) -> list[str]:
    return [t for t in TASK_ORDER if t in tasks] + sorted(set(tasks) - set(TASK_ORDER))


def _key_order(key: str):
    method, variant, budget = split_key(key)
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (-budget, rank, variant)


def retention(summary: dict) -> dict[str, dict[str, float]]:
    """Mean score of each ``method@budget`` as a fraction of dense's on the same task, plus ``"average"`` over
    the tasks when every task dense has is present."""
    dense = summary["runs"].get("dense@1.0", {})
    result = {}
    for key, by_task in summary["runs"].items():
        kept = {t: by_task[t]["mean"] / dense[t]["mean"] for t in by_task if t in dense and dense[t]["mean"]}
        if kept and set(kept) == set(dense):
            kept["average"] = statistics.fmean(kept.values())
        result[key] = kept
    return result


# Issue 12's targets: RankDyna's average retention at each budget, and the budgets where it must lead FWSVD.
RETENTION_TARGETS = {0.5: 0.99, 0.33: 0.97, 0.2: 0.93}
AHEAD_OF_FWSVD_AT = (0.33, 0.2)


def target_lines(summary: dict, records: list[dict], notes: dict[str, str] | None = None,
                 dense_clocks: list[dict] = ()) -> list[str]:
    """Where RankDyna stands against the targets: issue 28's (equal steps and one round, over the tasks that decide;
    ``glue_targets``), then issue 12's (one round, over every task) read off the summary, plus each method's mean
    training loss per task (for the why: a post-hoc method's second round starts from a fine-tuned model)."""
    from . import glue_targets  # built on this module's helpers, so imported when the page is made

    kept, runs = retention(summary), summary["runs"]
    tasks = list(summary["majority"])
    paired = paired_differences(records)
    timed = [r for r in records if r.get("file") not in clock_unusable(records, notes)]
    lines = ["## Against the targets", ""]
    lines += glue_targets.section(records, summary, _times_dense(timed, dense_clocks))
    lines += _paired_table(paired_differences(records, glue_targets.EQUAL), tasks, "rankdyna_equal")
    lines += ([""] if lines[-1] else []) + ["### One round, average over all four tasks (issue 12's targets)", "",
             "Targets: RankDyna keeps at least " + " / ".join(f"{100 * t:g} %" for t in RETENTION_TARGETS.values())
             + " of dense (average over the four tasks) at " + " / ".join(f"{b:g}" for b in RETENTION_TARGETS)
             + ", and is ahead of FWSVD at " + " and ".join(f"{b:g}" for b in AHEAD_OF_FWSVD_AT) + ".", ""]
    for budget, target in RETENTION_TARGETS.items():
        rd, fw = kept.get(f"rankdyna@{budget:g}", {}), kept.get(f"fwsvd@{budget:g}", {})
        seeds = [runs[k][t]["n"] for k in (f"rankdyna@{budget:g}", f"fwsvd@{budget:g}") for t in runs.get(k, {})]
        provisional = " *(provisional: fewer than 3 seeds in some cells)*" if not seeds or min(seeds) < 3 else ""
        if "average" in rd:
            verdict = "meets" if rd["average"] >= target else "misses"
            head = f"RankDyna keeps **{100 * rd['average']:.1f} %** ({verdict} {100 * target:g} %)"
        else:
            head = "RankDyna's average is not measurable yet (" + ", ".join(t.upper() for t in tasks if t not in rd)
            head += " missing)"
        if "average" in fw:
            head += f"; FWSVD keeps {100 * fw['average']:.1f} %"
            if "average" in rd:
                head += f" (RankDyna {'ahead' if rd['average'] > fw['average'] else 'behind'} on the average)"
        gaps = {t: statistics.fmean(d) for t, d in paired.get(budget, {}).items()}
        ahead = [t.upper() for t in tasks if t in gaps and gaps[t] > 0]
        behind = [t.upper() for t in tasks if t in gaps and gaps[t] <= 0]
        lead = (f"ahead of FWSVD on {', '.join(ahead) or 'no task'}, behind or level on "
                f"{', '.join(behind) or 'no task'} (over the seeds both ran)" if ahead or behind
                else "no task has both methods yet")
        must = " (must be ahead here)" if budget in AHEAD_OF_FWSVD_AT else ""
        lines.append(f"- Budget {budget:g}: {head}; {lead}{must}.{provisional}")
    lines += _paired_table(paired, tasks, "RankDyna")
    losses = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("train_loss") is not None:
            losses[run_key(r).partition("@")[0]][r["task"]].append(r["train_loss"])
    shown = [m for m in ("dense", "rankdyna", "fwsvd") if m in losses]
    if shown:
        lines += ["", "Mean training loss of a run (Trainer's `train_loss`, averaged over budgets and seeds; FWSVD's "
                  "is its second round's, which starts from the fine-tuned dense model):", "",
                  "| method | " + " | ".join(t.upper() for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for m in shown:
            lines.append(f"| {m} | " + " | ".join(f"{statistics.fmean(losses[m][t]):.3f}" if losses[m].get(t)
                                                  else "—" for t in tasks) + " |")
    return lines + ["", "The analysis of these numbers is in [method.md](method.md#glue-against-fwsvd).", ""]


def paired_differences(records: list[dict], method: str = "rankdyna",
                       against: str = "fwsvd") -> dict[float, dict[str, list[float]]]:
    """Per budget and task, ``method``'s score minus ``against``'s (x100) for each seed both ran. A seed fixes the
    data order and the new head's initialization of both runs (and the dense round FWSVD starts from), so the
    difference leaves that seed-to-seed noise out, and a seed only one method has yet cannot tilt the comparison."""
    scores = {(run_key(r), r["task"], r["seed"]): r["score"] for r in records}
    gaps = defaultdict(lambda: defaultdict(list))
    for (key, task, seed), score in scores.items():
        _, variant, budget = split_key(key)
        other = scores.get((f"{against}@{budget:g}", task, seed))
        if variant == method and other is not None:
            gaps[budget][task].append(score - other)
    return {b: dict(by_task) for b, by_task in gaps.items()}


def _paired_table(paired: dict[float, dict[str, list[float]]], tasks: list[str], name: str) -> list[str]:
    if not paired:
        return []
    lines = ["", f"{name} minus FWSVD, paired by seed (points; mean over the seeds both ran, then how many of those "
             f"seeds {name} was ahead on):", "",
             "| budget | " + " | ".join(t.upper() for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for budget in sorted(paired, reverse=True):
        cells = [f"{statistics.fmean(d):+.1f} ({sum(x > 0 for x in d)}/{len(d)})" if (d := paired[budget].get(t))
                 else "—" for t in tasks]
        lines.append(f"| {budget:g} | " + " | ".join(cells) + " |")
    return lines


def missing_cells(summary: dict, tasks: list[str], budgets: list[float]) -> list[str]:
    """What the campaign still lacks: every (method, budget, task) below its required number of seeds (3 for
    dense, rankdyna and fwsvd, 1 for the others)."""
    runs = summary["runs"]
    lines = []
    for method in METHOD_ORDER:
        keys = ["{}@1.0".format(method)] if method in UNCOMPRESSED else [f"{method}@{b:g}" for b in budgets]
        need = REQUIRED_SEEDS.get(method, 1)
        for key in keys:
            short = [f"{t.upper()} (n={runs.get(key, {}).get(t, {}).get('n', 0)})" for t in tasks
                     if runs.get(key, {}).get(t, {}).get("n", 0) < need]
            if short:
                lines.append(f"`{key}` needs n={need}: " + ", ".join(short))
    return lines


def plot_retention(summary: dict, path: str) -> None:
    """Average retention (over the tasks) against budget, one line per method; dense is the 100 % line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = retention(summary)
    lines = defaultdict(list)
    partial = defaultdict(list)
    for key, values in kept.items():
        method, variant, budget = split_key(key)
        if method in UNCOMPRESSED:
            continue
        if "average" in values:
            lines[variant].append((budget, 100 * values["average"]))
        elif values:
            partial[variant].append((budget, 100 * statistics.fmean(values.values())))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHOD_ORDER)}
    for variant in sorted(set(lines) | set(partial), key=lambda v: (_method_rank(v), v)):
        color = colors.get(variant.split("+")[0], "black")
        style = "--" if "+" in variant else "-"
        if lines[variant]:
            points = sorted(lines[variant])
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", color=color, label=variant)
        if partial[variant]:
            points = sorted(partial[variant])
            ax.plot([p[0] for p in points], [p[1] for p in points], ":", marker="x", color=color,
                    label=f"{variant} (not every task)")
    if "adalora@1.0" in kept and "average" in kept["adalora@1.0"]:
        ax.axhline(100 * kept["adalora@1.0"]["average"], color=colors["adalora"], linestyle="-.",
                   label="adalora (uncompressed)")
    ax.axhline(100, color=colors["dense"], linestyle="--", label="dense")
    targets = sorted(RETENTION_TARGETS.items())
    ax.plot([b for b, _ in targets], [100 * t for _, t in targets], linestyle="none", marker="_", markersize=14,
            markeredgewidth=2, color="gray", label="RankDyna's target")
    ax.set_xlabel("parameter budget (fraction of the targeted weights)")
    ax.set_ylabel("retention: score / dense score, %")
    ax.set_title("MiniLM on GLUE: retention averaged over the tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _method_rank(variant: str) -> int:
    method = variant.split("+")[0]
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _cell(stats: dict | None) -> str:
    if not stats:
        return "—"
    if stats["n"] == 1:
        return f"{stats['mean']:.1f} (n=1)"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}" + ("" if stats["n"] == 3 else f" (n={stats['n']})")


def _wall_times(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    by_key = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_key[run_key(r)][r["task"]].append(r["wall_time"]["total_s"])
    return by_key


def _wall_parts(records: list[dict]) -> dict[str, dict[str, float]]:
    parts = defaultdict(lambda: defaultdict(list))
    for r in records:
        for name, seconds in r["wall_time"].items():
            parts[run_key(r)][name].append(seconds)
    return {k: {name: statistics.fmean(v) for name, v in p.items()} for k, p in parts.items()}


# A run and a dense run finished this close together ran in one session, on one machine: their clocks compare.
SAME_SESSION_S = 24 * 3600


def _times_dense(timed: list[dict], dense_clocks: list[dict] = ()) -> dict[str, float]:
    """Per ``method@budget``: each run's time over a dense run's of the same task and seed that ran on the same
    machine, averaged per task, then over the tasks. The campaign's sessions ran on machines of the same kind whose
    speed differed by up to 1.5x, and rows were re-run sessions later, so a run is paired with the dense run of its
    task and seed that finished closest to it, among the campaign's and ``dense_clocks`` (dense runs re-timed beside
    re-run rows), and only within SAME_SESSION_S; a run with no such dense run is left out of the ratio."""
    dense = defaultdict(list)
    for r in [r for r in timed if r["method"] == "dense"] + list(dense_clocks):
        dense[r["task"], r["seed"]].append((_finished(r), r["wall_time"]["total_s"]))
    ratios = defaultdict(lambda: defaultdict(list))
    for r in timed:
        when = _finished(r)
        # A record without its finishing time (older files) pairs by task and seed alone.
        near = [(0.0 if None in (when, t) else abs(when - t), seconds)
                for t, seconds in dense.get((r["task"], r["seed"]), [])]
        if near and min(near)[0] <= SAME_SESSION_S:
            ratios[run_key(r)][r["task"]].append(r["wall_time"]["total_s"] / min(near)[1])
    return {key: statistics.fmean(statistics.fmean(v) for v in per_task.values()) for key, per_task in ratios.items()}


def _finished(record: dict) -> float | None:
    """When the run finished (``finished``, ISO 8601 with its offset), in seconds since the epoch; None if unknown."""
    import datetime

    finished = record.get("finished")
    return datetime.datetime.fromisoformat(finished).timestamp() if finished else None


def _wall_cell(kept: list[float], dropped: int) -> str:
    mark = "†" if dropped else ""
    return f"{statistics.fmean(kept):.0f}{mark}" if kept else ("—" + mark)


def render_report(summary: dict, records: list[dict], plot_name: str, summary_path: str,
                  latency: dict | None = None, cost: dict | None = None, commands: list[str] | None = None,
                  budgets: list[float] | None = None, notes: dict[str, str] | None = None,
                  dense_clocks: list[dict] = ()) -> str:
    """The Markdown page: tables from ``summary``, wall times and the protocol from ``records``; ``dense_clocks``:
    dense runs re-timed beside re-run rows (their clocks only; see ``_times_dense``)."""
    tasks = list(summary["majority"])
    commands = commands or sorted({r["command"] for r in records if "command" in r})
    budgets = budgets or sorted({split_key(k)[2] for k in summary["runs"]} - {1.0}, reverse=True)
    lines = ["# GLUE benchmark: RankDyna against the baselines", "",
             f"Generated by `scripts/benchmark_glue.py` from `{summary_path}` and the run files; do not edit by hand.",
             "Regenerate without running anything:", "", "    python scripts/benchmark_glue.py --report_only", ""]
    lines += _setup_lines(records, commands)
    lines += _score_table(summary, tasks)
    lines += _retention_table(summary, tasks)
    dense_clocks = [r for r in dense_clocks if not shared_machine(r.get("cpu_share"))]
    lines += target_lines(summary, records, notes, dense_clocks)
    lines += [f"![average retention against budget]({plot_name})", "",
              "Plot: the mean score of each method and budget divided by dense's on the same task, averaged over "
              "the tasks (solid: every task measured; dotted: only some tasks so far; gray dashes: RankDyna's "
              "targets).", ""]
    lines += _wall_table(records, tasks, clock_unusable(records, notes), dense_clocks)
    if notes:
        lines += ["Notes on individual run files (`notes.json` beside them; the files themselves are as written). A "
                  "run whose note starts with \"wall time\" keeps its score but is left out of the wall-time table "
                  "(its cells are marked †), and so is a post-hoc run of the same task and seed when the note is "
                  "on a dense run:", ""]
        lines += [f"- `{name}`: {text}" for name, text in sorted(notes.items())] + [""]
    if latency:
        lines += latency_lines(latency)
    if cost:
        lines += cost_lines(cost)
    lines += ["## Missing", ""]
    missing = missing_cells(summary, TASK_ORDER, budgets)
    absent = [t.upper() for t in TASK_ORDER if t not in tasks]
    if absent:
        lines.append(f"- No run at all yet for {', '.join(absent)}.")
    lines += [f"- {m}" for m in missing] or ["- Nothing: every required cell has its seeds."]
    from . import glue_targets

    unpaired = glue_targets.unpaired_runs(records)
    if unpaired:
        lines += ["", "Runs the paired comparisons against FWSVD leave out (the other row has no run of that task, "
                  "budget and seed):", ""] + [f"- {u}" for u in unpaired]
    lines.append("")
    return "\n".join(lines)


def _setup_lines(records: list[dict], commands: list[str] | None) -> list[str]:
    if not records:
        return ["No run files yet.", ""]
    protocols = {}
    for r in records:
        protocols.setdefault(r["task"], r["protocol"])
    devices = sorted({f"{r['device']['type']} ({r['device']['name']}, {r['device']['threads']} threads)"
                      for r in records})
    commits = defaultdict(set)  # one line per software stack, not per commit
    for r in records:
        stack = {k: v for k, v in r["versions"].items() if k != "commit"}
        commits[", ".join(f"{k} {v}" for k, v in stack.items())].add(r["versions"].get("commit", "unknown"))
    versions = [f"{stack} (commits {', '.join(sorted(c))})" for stack, c in sorted(commits.items())]
    lines = ["## Setup", "",
             "Model: the packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a new classification head. "
             "Every method gets the same fine-tuning round per task (the protocol below); the post-hoc methods "
             "(svd, fwsvd, tfwsvd, ars) compress the dense model fine-tuned with the same seed, then fine-tune "
             "once more with the same round. Scores are on the full dev set, x100. The floor is the best constant "
             "prediction on the dev set (the majority class; for CoLA's Matthews correlation every constant "
             "scores 0).", "",
             "| task | metric | training rows | epochs | max length | learning rate | batch | floor |",
             "|---|---|---|---|---|---|---|---|"]
    floors = {r["task"]: r["floor"]["score"] for r in records}
    for task in _ordered_tasks(protocols):
        p = protocols[task]
        lines.append(f"| {task.upper()} | {METRIC_NAMES.get(p['metric'], p['metric'])} | {p['train_rows_used']} | "
                     f"{p['epochs']:g} | {p['max_seq_length']} | {p['learning_rate']:g} | {p['batch_size']} | "
                     f"{floors[task]:.1f} |")
    mixed = sorted({t for r in records for t in [r["task"]] if r["protocol"] != protocols[t]})
    lines += [""]
    if mixed:
        lines += [f"**Warning:** the run files of {', '.join(t.upper() for t in mixed)} do not all share one "
                  "protocol; their rows mix settings.", ""]
    any_p = next(iter(protocols.values()))
    lines += [f"Shared settings: dynamic padding, sampling `{any_p['sampling']}`, warm-up ratio "
              f"{any_p['warmup_ratio']}, weight decay {any_p['weight_decay']}, AdaLoRA learning rate "
              f"{any_p['adalora_learning_rate']:g} (adapters), Fisher batches {any_p['fisher_batches']}, ARS steps "
              f"{any_p['ars_steps']}, TFWSVD ALS sweeps {any_p['als_iterations']}, RankDyna reallocation interval "
              f"{any_p['rankdyna_interval']}.", "",
              "Row names: `rankdyna` prunes the FFNs by intermediate channels and the attention by per-head q/k "
              "and v/o channels in one budget (`ffn_groups='channels'`, `attention_groups='channels'`: what the "
              "library's default `'auto'` does on MiniLM; [method.md](method.md#ffn-channels-as-groups), "
              "[attention channels](method.md#attention-channels-as-groups)); `rankdyna_equal` is the same run with "
              "as many optimizer steps as FWSVD's two rounds together (twice the protocol's epochs in one run; "
              "[Against the targets](#against-the-targets)); `+singular` uses singular groups in the FFNs, "
              "`+attn_singular` in the attention (both: the paper's form); `+m8` keeps ranks in multiples of 8.", "",
              "Devices: " + "; ".join(devices) + ".", "", "Versions: " + "; ".join(versions) + ".", ""]
    lines += ["Commands that made the runs:", "", "```"] + (commands or ["(none recorded)"]) + ["```", ""]
    return lines


def _score_table(summary: dict, tasks: list[str]) -> list[str]:
    header = "| method | budget | " + " | ".join(t.upper() for t in tasks) + " |"
    lines = ["## Scores (mean ± std over seeds; n=3 unless marked)", "", header,
             "|" + "---|" * (len(tasks) + 2),
             "| *floor (constant prediction)* | — | " + " | ".join(f"*{summary['majority'][t]:.1f}*" for t in tasks)
             + " |"]
    for key, by_task in summary["runs"].items():
        _, variant, budget = split_key(key)
        budget_cell = "—" if split_key(key)[0] in UNCOMPRESSED else f"{budget:g}"
        lines.append(f"| {variant} | {budget_cell} | " + " | ".join(_cell(by_task.get(t)) for t in tasks) + " |")
    dense = summary["runs"].get("dense@1.0", {})
    weak = [f"{t.upper()} (dense {dense[t]['mean']:.1f}, floor {summary['majority'][t]:.1f})" for t in tasks
            if t in dense and dense[t]["mean"] < summary["majority"][t] + DECISIVE_MARGIN]
    lines.append("")
    if weak:
        lines += [f"**Read with care:** dense is less than {DECISIVE_MARGIN:g} points above the floor on "
                  f"{', '.join(weak)}; there the differences between methods are mostly noise, so the targets report "
                  "it apart.", ""]
    floored = [f"{key} on {t.upper()} ({stats['mean']:.1f})"
               for key, by_task in summary["runs"].items() if key != "dense@1.0"
               for t, stats in by_task.items() if t in summary["majority"]
               and stats["mean"] < summary["majority"][t] + FLOOR_MARGIN]
    if floored:
        lines += [f"**At the floor** (less than {FLOOR_MARGIN:g} point above the constant prediction): "
                  + "; ".join(floored) + ". These models learned little or nothing of the task.", ""]
    return lines


HEADLINE_ROWS = {"rankdyna": "RankDyna, one round", "rankdyna_equal": "RankDyna, FWSVD's steps in one run",
                 "fwsvd": "FWSVD, two rounds"}


def headline_table(summary: dict, methods: tuple[str, ...] = tuple(HEADLINE_ROWS),
                   budgets: tuple[float, ...] = (0.5, 0.33, 0.2)) -> list[str]:
    """A short table for the README: the floor and dense, then per budget one row per method (those with runs), with
    its mean score per task (the seed count beside a mean of fewer than three) and its average retention against
    dense: over every task, and over the tasks that decide when one is set apart."""
    from . import glue_targets  # built on this module's helpers

    tasks = _ordered_tasks(summary["majority"])
    runs, kept = summary["runs"], retention(summary)
    deciding = glue_targets.deciding_tasks(summary)
    set_apart = bool(deciding) and len(deciding) < len(tasks)
    header = ["row", "budget", *(t.upper() for t in tasks), "kept of dense (average)"]
    if set_apart:
        header.append(f"kept of dense (average of {', '.join(t.upper() for t in deciding)})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| floor (constant prediction) | | " + " | ".join(f"{summary['majority'][t]:.1f}" for t in tasks)
             + " |" + " |" * (len(header) - 2 - len(tasks))]

    def score(cell: dict | None) -> str:
        if not cell:
            return "—"
        return f"{cell['mean']:.1f}" + (f" (n {cell['n']})" if cell["n"] < 3 else "")

    def row(name: str, budget: str, key: str) -> str:
        by_task, kept_by_task = runs[key], kept.get(key, {})
        cells = [name, budget, *(score(by_task.get(t)) for t in tasks)]
        average = kept_by_task.get("average")
        cells.append(f"{100 * average:.1f} %" if average is not None else "—")
        if set_apart:
            cells.append(f"{100 * statistics.fmean(kept_by_task[t] for t in deciding):.1f} %"
                         if all(t in kept_by_task for t in deciding) else "—")
        return "| " + " | ".join(cells) + " |"

    if "dense@1.0" in runs:
        lines.append(row("dense", "1", "dense@1.0"))
    for budget in budgets:
        lines += [row(HEADLINE_ROWS.get(m, m), f"{budget:g}", f"{m}@{budget:g}") for m in methods
                  if f"{m}@{budget:g}" in runs]
    return lines


def _retention_table(summary: dict, tasks: list[str]) -> list[str]:
    from . import glue_targets

    kept = retention(summary)
    deciding = glue_targets.deciding_tasks(summary)
    decide = ", ".join(t.upper() for t in deciding) or "none yet"
    header = ("| method | budget | " + " | ".join(t.upper() for t in tasks)
              + f" | average, all tasks | average, tasks that decide ({decide}) |")
    lines = ["## Retention against dense (mean score / dense mean score)", "", header,
             "|" + "---|" * (len(tasks) + 4)]
    for key, values in kept.items():
        method, variant, budget = split_key(key)
        if method == "dense":
            continue
        cells = [f"{100 * values[t]:.1f} %" if t in values else "—" for t in tasks]
        average = f"{100 * values['average']:.1f} %" if "average" in values else "—"
        over, _ = glue_targets.average_retention(summary, key, deciding)
        if glue_targets.undecided_tasks(summary):
            over = None  # a task without dense might decide: no average over an unknown set
        lines.append(f"| {variant} | {'—' if method in UNCOMPRESSED else f'{budget:g}'} | " + " | ".join(cells)
                     + f" | {average} | " + (f"**{100 * over:.1f} %**" if over is not None else "—") + " |")
    return lines + ["", "Each average is shown only when the row has every task it is over: all the tasks dense was "
                    "run on, or the tasks that decide (dense at least "
                    f"{DECISIVE_MARGIN:g} points above the floor; [Against the targets]"
                    "(#against-the-targets)), which issue 28's targets use.", ""]


def _wall_table(records: list[dict], tasks: list[str], unusable: set[str] = frozenset(),
                dense_clocks: list[dict] = ()) -> list[str]:
    timed = [r for r in records if r.get("file") not in unusable]
    walls, parts, every = _wall_times(timed), _wall_parts(timed), _wall_times(records)
    header = ("| method | budget | " + " | ".join(t.upper() for t in tasks)
              + " | × dense | dense round | compression | own round |")
    lines = ["## Wall time per run (seconds, mean over seeds)", "",
             "One run of an in-training method (dense, rankdyna, adalora) is one fine-tuning round plus export; a "
             "post-hoc method's run is the dense round of the same seed, its compression (Fisher, masks, ALS) and "
             "a second round. `× dense` is the run's time over the dense run's of the same task and seed on the "
             "same machine (the campaign's sessions ran on machines whose speed differed, and rows were re-run "
             "later: a run is paired with the dense run of its task and seed that finished closest to it, "
             "within 24 h, the re-timed dense runs included; none there, it is left out), averaged over seeds, "
             "then over the tasks where both have a usable time; the last three columns split the run, averaged "
             "over tasks and seeds. † marks a cell that leaves out a run whose clock is not usable: its note is "
             "below, its measured CPU share (`cpu_share` in the run file: its own CPU time over the machine's busy "
             "CPU time) is below 0.9, or it is a post-hoc run whose dense round (its first) has such a note and was "
             "not trained again by the run itself.",
             "", header,
             "|" + "---|" * (len(tasks) + 6)]
    times_dense = _times_dense(timed, dense_clocks)
    for key in sorted(every, key=_key_order):
        method, variant, budget = split_key(key)
        cells = [_wall_cell(walls[key][t], len(every[key][t]) - len(walls[key][t])) if t in every[key] else "—"
                 for t in tasks]
        p = parts.get(key, {})
        ratio = f"{times_dense[key]:.2f}" if key in times_dense else "—"
        lines.append(f"| {variant} | {'—' if method in UNCOMPRESSED else f'{budget:g}'} | " + " | ".join(cells)
                     + f" | {ratio} | {p.get('first_round_s', 0):.0f} | {p.get('compress_s', 0):.0f} | "
                     f"{p.get('fine_tune_s', 0):.0f} |")
    return lines + [""]


def latency_lines(latency: dict) -> list[str]:
    """The side-by-side latency table (``benchmark_glue.py --latency_rounds``)."""
    lines = ["## Exported speed against dense", "",
             f"Every layout rebuilt from its rank pattern and timed round-robin against the dense model in one "
             f"process: {latency['rounds']} rounds, median forward of a {latency['batch_size']} x "
             f"{latency['seq_len']} batch, {latency['device']}, {latency['threads']} torch threads. Ideal speed-up "
             f"= dense forward FLOPs / exported forward FLOPs of the whole model (every Linear/Conv1D matmul, "
             f"the pooler and head included, plus the attention scores at this length; "
             f"`rankdyna_trainer.flops.forward_flops`). Fraction of ideal = measured speed-up / ideal. "
             f"`uniform` layouts are the near-uniform ranks of svd/fwsvd/tfwsvd at each budget; the trained "
             f"methods' layouts are rank patterns "
             f"of their run files (those named by `--latency_patterns_from` in the command; the task in brackets), "
             f"and `rounded +m8` is that pattern re-allocated in blocks of 8 under the same budget. The profiled "
             f"columns split one forward into matmul kernels and everything else; the Amdahl bound is the speed-up "
             f"if only dense's matmul time shrank by the FLOP ratio.", "",
             "```", latency["command"], "```", "",
             "| layout | rank multiple | params kept | GFLOPs | ms | speed-up | ideal | fraction of ideal "
             "| matmul / other ms (profiled) | Amdahl bound | fraction of bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = latency["layouts"]["dense"]
    dense_profile = dense.get("profile")
    for name, entry in latency["layouts"].items():
        speedup = dense["median_ms"] / entry["median_ms"]
        ideal = dense["flops"] / entry["flops"]
        fraction = f"{speedup / ideal:.2f}" if name != "dense" else "—"
        profile, bound_cells = entry.get("profile"), "— | — | —"
        if profile and dense_profile:
            # Only the matmul share of dense's time can shrink by the FLOP ratio; the rest stays.
            dense_total = dense_profile["matmul_ms"] + dense_profile["other_ms"]
            bound = dense_total / (dense_profile["other_ms"] + dense_profile["matmul_ms"] / ideal)
            bound_cells = (f"{profile['matmul_ms']:.0f} / {profile['other_ms']:.0f} | {bound:.2f} | "
                           + (f"{speedup / bound:.2f}" if name != "dense" else "—"))
        lines.append(f"| {name} | {entry.get('rank_multiple', 1)} | {entry['params_fraction']:.3f} | "
                     f"{entry['flops'] / 1e9:.1f} | {entry['median_ms']:.0f} | {speedup:.2f} | {ideal:.2f} | "
                     f"{fraction} | {bound_cells} |")
    return lines + [""] + latency_verdict(latency) + [""]


def latency_verdict(latency: dict) -> list[str]:
    """Plain statements read off the latency table: the 0.9-of-ideal target, and what rounding ranks changed."""
    layouts = latency["layouts"]
    dense = layouts["dense"]

    def fraction(entry):
        return (dense["median_ms"] / entry["median_ms"]) / (dense["flops"] / entry["flops"])

    lines = []
    for name, entry in layouts.items():
        variant, _, budget = name.partition("@")
        if variant != "uniform":
            continue
        target = "meets" if fraction(entry) >= 0.9 else "misses"
        rounded = [f"{n.partition('@')[0].removeprefix('uniform+')}: {fraction(e):.2f}" for n, e in layouts.items()
                   if n.startswith("uniform+m") and n.endswith(f"@{budget}")]
        lines.append(f"- Budget {budget}: near-uniform ranks reach {fraction(entry):.2f} of the ideal speed-up "
                     f"({target} the 0.9 target)" + (f"; rounded to multiples ({', '.join(rounded)})." if rounded
                                                     else "."))
        for name, entry in layouts.items():  # RankDyna's own layout at this budget, as the campaign runs it
            if name.startswith(f"rankdyna@{budget} (") and "rounded" not in name:
                target = "meets" if fraction(entry) >= 0.9 else "misses"
                rounded = [f"{n.rpartition(' ')[2]}: {fraction(e):.2f}" for n, e in layouts.items()
                           if n.startswith(f"{name} rounded")]
                lines.append(f"  RankDyna's layout {name.partition(' ')[2]} reaches {fraction(entry):.3f} ({target} "
                             f"it)" + (f"; rounded ({', '.join(rounded)})." if rounded else "."))
    return lines


def cost_lines(cost: dict) -> list[str]:
    """The CPU cost table (``benchmark_glue.py --measure_cost``)."""
    lines = ["## Cost of a training step on this machine", "",
             f"`{cost['command']}` ({cost['device']}). A dense MiniLM optimizer step (forward, backward, AdamW) of "
             f"batch {cost['batch_size']} timed at each padded length and thread count (median of "
             f"{cost['steps']} steps); an epoch's time is the sum over its batches of the step time at the "
             f"batch's padded length (interpolated), with the batches each padding/sampling setting makes from "
             f"the task's real training rows.", "",
             "| threads | " + " | ".join(f"length {n}" for n in cost["lengths"]) + " |",
             "|" + "---|" * (len(cost["lengths"]) + 1)]
    for threads, times in cost["step_s"].items():
        lines.append(f"| {threads} | " + " | ".join(f"{t:.2f} s" for t in times) + " |")
    lines += ["", "| task | setting | mean padded length | epoch estimate (1 thread) | epoch estimate (2 threads) |",
              "|---|---|---|---|---|"]
    for task, settings in cost["epochs"].items():
        for setting, e in settings.items():
            lines.append(f"| {task.upper()} | {setting} | {e['mean_length']:.1f} | {e['epoch_s']['1'] / 60:.1f} min "
                         f"| {e['epoch_s']['2'] / 60:.1f} min |")
    return lines + [""] + cost.get("notes", []) + [""]


# ----------------------------------------------------------------------------------------------------------
# controls: runs kept outside the campaign's folder (one variant per folder), set beside the campaign's cells
SEEDS = (42, 1, 2)


def _seed_scores(records: list[dict], key: str, task: str) -> dict[int, float]:
    return {r["seed"]: r["score"] for r in records if run_key(r) == key and r["task"] == task}


def _seed_cell(scores: dict[int, float]) -> str:
    """``a / b / c (**mean**)`` over SEEDS, ``·`` for a seed not run, the mean only when all ran."""
    if not scores:
        return "—"
    cell = " / ".join(f"{scores[s]:.1f}" if s in scores else "·" for s in SEEDS)
    return cell + (f" (**{statistics.fmean(scores[s] for s in SEEDS):.1f}**)" if set(SEEDS) <= set(scores) else "")


def control_table(campaign: list[dict], variants: dict[str, list[dict]], method: str = "rankdyna",
                  against: str = "fwsvd") -> list[str]:
    """Markdown rows: every (task, budget) cell one of ``variants`` ran for ``method``, with the task's floor, dense's
    mean, the campaign's ``method`` and ``against`` per seed (42 / 1 / 2), and each variant's runs likewise. A variant
    folder holds one variant, so its runs of ``method`` count whatever row tag their config gives them
    (``+attn_singular``)."""
    variants = {name: [{**r, "_key": f"{method}@{r['budget']:g}"} for r in runs
                       if r["method"] == method] for name, runs in variants.items()}
    cells = {(r["task"], r["budget"]) for runs in variants.values() for r in runs}
    order = _ordered_tasks({task for task, _ in cells})
    cells = sorted(cells, key=lambda cell: (order.index(cell[0]), -cell[1]))
    summary = summarize(campaign)
    lines = [f"| cell | floor | dense | {method} (campaign) | " + " | ".join(variants) + f" | {against} |",
             "|" + "---|" * (len(variants) + 5)]
    for task, budget in cells:
        key = f"{method}@{budget:g}"
        row = [f"{task.upper()} @ {budget:g}", f"{summary['majority'][task]:.1f}",
               f"{summary['runs']['dense@1.0'][task]['mean']:.1f}", _seed_cell(_seed_scores(campaign, key, task))]
        row += [_seed_cell({r["seed"]: r["score"] for r in runs if r["_key"] == key and r["task"] == task})
                for runs in variants.values()]
        row.append(_seed_cell(_seed_scores(campaign, f"{against}@{budget:g}", task)))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def average_retention(records: list[dict], seed: int | None = None, tasks: list[str] | None = None) -> dict[str, float]:
    """Each ``method@budget``'s average retention (``retention``'s ``"average"``) over ``tasks`` (default: all), from
    the runs of one ``seed`` (each score over that seed's dense) or, without one, from the means over seeds."""
    kept = [r for r in records if (seed is None or r["seed"] == seed) and (tasks is None or r["task"] in tasks)]
    return {key: row["average"] for key, row in retention(summarize(kept)).items() if "average" in row}
