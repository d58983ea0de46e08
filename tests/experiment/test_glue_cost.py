"""experiment/glue_cost.py: runs made one after the other, over the same window's dense runs."""

import pytest

from rankdyna_trainer.experiment import glue_cost

from .test_glue_report import run_record


def _run(task, method, budget, seed, total_s, finished, step_cost=None):
    run = run_record(task, method, budget, seed, 80.0, total_s=total_s)
    run["finished"] = f"2026-12-06T{finished}:00+00:00"
    if step_cost:
        run["step_cost"] = step_cost
    return run


def test_each_run_is_over_the_mean_of_its_windows_dense_runs_in_finishing_order():
    cost = {"step_s": {"start": 0.2, "middle": 0.15, "end": 0.1}, "rankdyna_hook_total_s": 2.5, "peak_rss_mib": 1812.4,
            "step_part_s": {"forward_backward": {"start": 0.18, "middle": 0.13, "end": 0.09}}}
    runs = [_run("cola", "dense", None, 42, 160.0, "10:10"), _run("cola", "rankdyna", 0.2, 42, 120.0, "10:05", cost),
            _run("cola", "dense", None, 42, 140.0, "10:00"), _run("sst2", "rankdyna", 0.5, 42, 90.0, "11:00"),
            _run("cola", "dense", None, 1, 300.0, "09:00")]
    rows = glue_cost.side_by_side_table(runs)
    assert rows[2] == "| SST2 | 42 | rankdyna 0.5 | 11:00 | 80.0 | 90 |  |  |  |  |  |"  # no dense beside it: no ratio
    assert rows[3].startswith("| COLA | 1 | dense | 09:00 |")  # another seed's dense does not enter seed 42's mean
    assert rows[4].startswith("| COLA | 42 | dense | 10:00 | 80.0 | 140 | 0.93 |")
    assert rows[5] == ("| COLA | 42 | rankdyna 0.2 | 10:05 | 80.0 | 120 | 0.80 | 200 / 150 / 100 | 180 / 130 / 90 | "
                       "2.5 | 1812 |")
    assert rows[6].startswith("| COLA | 42 | dense | 10:10 | 80.0 | 160 | 1.07 |")


def test_the_summary_gives_each_task_its_ratios_per_budget_and_seed_over_the_same_seeds_dense():
    runs = [_run("mrpc", "dense", None, 42, 280.0, "10:00"), _run("mrpc", "dense", None, 42, 260.0, "12:00"),
            _run("mrpc", "dense", None, 1, 300.0, "10:05"),
            _run("mrpc", "rankdyna", 0.5, 42, 243.0, "10:10"), _run("mrpc", "rankdyna", 0.5, 1, 330.0, "10:15"),
            _run("mrpc", "rankdyna", 0.2, 1, 210.0, "10:20"), _run("mrpc", "rankdyna_equal", 0.2, 1, 500.0, "10:25"),
            _run("sst2", "rankdyna", 0.33, 2, 100.0, "10:30")]
    rows = glue_cost.side_by_side_summary(runs)
    assert rows[0] == ("| task | RankDyna / dense at 0.5 | RankDyna / dense at 0.33 | RankDyna / dense at 0.2 "
                       "| dense (s), seeds 42 / 1 / 2 |")
    # SST-2 first (the page's task order); its seed 2 has no dense run, so no ratio, and no dense clock
    assert rows[2] == "| SST2 | · / · / · | · / · / · | · / · / · | · / · / · |"
    # 243 / mean(280, 260) = 0.90, 330 / 300 = 1.10, mean 1.00; the equal-steps row is not a one-round run
    assert rows[3] == "| MRPC | 0.90 / 1.10 / · (**1.00**) | · / · / · | · / 0.70 / · (**0.70**) | 270 / 300 / · |"


def test_a_runs_steps_split_by_its_schedule_and_set_over_the_same_dense_steps():
    run = _run("cola", "rankdyna", 0.2, 42, 100.0, "10:00")
    run["optimizer_steps"] = 100
    run["config"] = {"warmup_fraction": 0.3, "final_fraction": 0.2, "reallocation_interval": 10, "beta1": 0.5,
                     "beta2": 0.5}
    parts = glue_cost.schedule_parts(run)
    # scores start 25 steps (beta 0.5) before pruning at 30; reallocations at 30, 40, ..., 70 and at 80, the target's
    assert parts["warm-up, unscored"] == list(range(5)) and parts["warm-up, scored"] == list(range(5, 30))
    assert parts["reallocation steps"] == [30, 40, 50, 60, 70, 80]
    assert len(parts["pruning, kept groups"]) == 45 and parts["at the target"] == list(range(81, 100))
    run["step_cost"] = {"every_step_ms": [300.0 if i in parts["reallocation steps"] else 100.0 for i in range(100)]}
    dense = _run("cola", "dense", None, 42, 200.0, "09:00", {"every_step_ms": [200.0] * 100})
    rows = glue_cost.schedule_cost_table(run, dense)
    assert rows[2] == "| warm-up, unscored | 5 | 0.5 | 1.0 | 0.50 |"
    assert rows[4] == "| reallocation steps | 6 | 1.8 | 1.2 | 1.50 |"
    assert rows[-1] == "| whole run | 100 | 11.2 | 20.0 | 0.56 |"
    dense["step_cost"]["every_step_ms"] = [200.0] * 99
    with pytest.raises(ValueError, match="100 and 99 steps"):
        glue_cost.schedule_cost_table(run, dense)
