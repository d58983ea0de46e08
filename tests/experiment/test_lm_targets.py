"""Issue 28's decoder target on the SmolLM2 page (experiment/lm_targets.py), from small run files."""

import json

from rankdyna_trainer.experiment import lm_targets, seed_noise


def write_recipe(folder, budget, perplexities):
    for seed, ppl in perplexities.items():
        (folder / f"rankdyna@{budget}_seed{seed}.json").write_text(
            json.dumps({"method": "rankdyna", "budget": budget, "seed": seed, "perplexity": ppl}))


def default_row(budget, perplexities):
    seeds = sorted(perplexities)
    values = [perplexities[s] for s in seeds]
    return {f"rankdyna@{budget}": {"perplexity": sum(values) / len(values), "perplexity_seeds": values,
                                   "seeds": seeds}}


def test_recipe_runs_are_read_per_budget_and_seed(tmp_path):
    write_recipe(tmp_path, 0.8, {0: 86.4, 1: 83.3})
    write_recipe(tmp_path, 0.5, {0: 206.6})
    assert lm_targets.load_recipe_runs(str(tmp_path)) == {0.8: {0: 86.4, 1: 83.3}, 0.5: {0: 206.6}}


def test_a_lower_default_is_met_and_a_higher_one_is_not_met_with_its_noise_reason(tmp_path):
    write_recipe(tmp_path, 0.8, {0: 86.4, 1: 83.3, 2: 82.6})
    write_recipe(tmp_path, 0.5, {0: 206.6, 1: 197.5, 2: 203.6})
    results = {**default_row(0.8, {0: 87.4, 1: 82.5, 2: 82.0}), **default_row(0.5, {0: 215.4, 1: 196.1, 2: 203.1})}
    lines = lm_targets.default_against_recipe(results, lm_targets.load_recipe_runs(str(tmp_path)), "recipe")
    at80, at50 = (line for line in lines if line.startswith("- "))
    assert at80.startswith("- 80% kept: **met** (84.0 against 84.1; +1.0 / -0.8 / -0.6 by seed 0, 1, 2; mean -0.1")
    gaps = [215.4 - 206.6, 196.1 - 197.5, 203.1 - 203.6]
    assert seed_noise.inside_noise(gaps)
    assert at50 == ("- 50% kept: **not met** (204.9 against 202.6; +8.8 / -1.4 / -0.5 by seed 0, 1, 2; "
                    f"{seed_noise.noise_text(gaps)}): the gap is inside the seeds' noise, so on these seeds the two "
                    "rows are level, not measured apart.")


def test_a_default_worse_on_every_seed_gets_no_noise_excuse(tmp_path):
    write_recipe(tmp_path, 0.5, {0: 200.0, 1: 200.0, 2: 200.0})
    lines = lm_targets.default_against_recipe(default_row(0.5, {0: 210.0, 1: 211.0, 2: 212.0}),
                                              lm_targets.load_recipe_runs(str(tmp_path)), "recipe")
    assert "**not met** (211.0 against 200.0" in lines[-2] and "beyond the seeds' noise)." in lines[-2]
    assert "level" not in lines[-2]


def test_no_recipe_runs_add_nothing_and_a_missing_default_row_is_not_yet_measured(tmp_path):
    assert lm_targets.default_against_recipe({}, {}, "recipe") == []
    write_recipe(tmp_path, 0.5, {0: 200.0})
    lines = lm_targets.default_against_recipe({}, lm_targets.load_recipe_runs(str(tmp_path)), "recipe")
    assert "- 50% kept: **not yet measured** (no `rankdyna` row)." in lines
