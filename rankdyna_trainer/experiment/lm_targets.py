"""Issue 28's decoder target on the SmolLM2 page: the library-default RankDyna row at least as good (held-out
perplexity no higher) as the decoder recipe row it replaced, per budget, paired by seed."""

from __future__ import annotations

import glob
import json
import os
import statistics

from .seed_noise import inside_noise, noise_text

DEFAULT_ROW = "rankdyna"


def load_recipe_runs(runs_dir: str) -> dict[float, dict[int, float]]:
    """Per budget, each seed's perplexity from the recipe's run files (``<method>@<budget>_seed<n>.json``)."""
    runs: dict[float, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        runs.setdefault(float(record["budget"]), {})[int(record["seed"])] = float(record["perplexity"])
    return runs


def default_against_recipe(results: dict, recipe: dict[float, dict[int, float]], recipe_dir: str) -> list[str]:
    """The page's lines: per budget the default row's mean against the recipe's, met when it is no higher, with the
    paired differences and, where not met, whether the gap is inside the seeds' noise."""
    if not recipe:
        return []
    lines = ["## Against issue 28's target", "",
             f"The default `RankDynaConfig(target_budget=b)` row at least as good as the decoder recipe's row "
             f"(`{recipe_dir}/`, the same resolved config run before issue 25's kept-groups compute); "
             "differences are default minus recipe, paired by seed:", ""]
    for budget in sorted(recipe, reverse=True):
        row = results.get(f"{DEFAULT_ROW}@{budget}")
        if row is None:
            lines.append(f"- {budget:.0%} kept: **not yet measured** (no `{DEFAULT_ROW}` row).")
            continue
        ours = dict(zip(row["seeds"], row["perplexity_seeds"]))
        seeds = sorted(set(ours) & set(recipe[budget]))
        gaps = [ours[s] - recipe[budget][s] for s in seeds]
        theirs = statistics.fmean(recipe[budget].values())
        met = row["perplexity"] <= theirs
        verdict = "**met**" if met else "**not met**"
        reason = ("" if met or not inside_noise(gaps) else
                  ": the gap is inside the seeds' noise, so on these seeds the two rows are level, not measured apart")
        lines.append(f"- {budget:.0%} kept: {verdict} ({row['perplexity']:.1f} against {theirs:.1f}; "
                     + " / ".join(f"{g:+.1f}" for g in gaps) + f" by seed {', '.join(map(str, seeds))}; "
                     + noise_text(gaps) + ")" + reason + ".")
    return lines + [""]
