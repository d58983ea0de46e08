"""experiment/glue_cost.py: runs made one after the other, over the same window's dense runs."""

from rankdyna_trainer.experiment import glue_cost

from .test_glue_report import run_record


def _run(task, method, budget, seed, total_s, finished, step_cost=None):
    run = run_record(task, method, budget, seed, 80.0, total_s=total_s)
    run["finished"] = f"2026-12-06T{finished}:00+00:00"
    if step_cost:
        run["step_cost"] = step_cost
    return run


def test_each_run_is_over_the_mean_of_its_windows_dense_runs_in_finishing_order():
    cost = {"step_s": {"start": 0.2, "middle": 0.15, "end": 0.1}, "rankdyna_hook_total_s": 2.5,
            "step_part_s": {"forward_backward": {"start": 0.18, "middle": 0.13, "end": 0.09}}}
    runs = [_run("cola", "dense", None, 42, 160.0, "10:10"), _run("cola", "rankdyna", 0.2, 42, 120.0, "10:05", cost),
            _run("cola", "dense", None, 42, 140.0, "10:00"), _run("sst2", "rankdyna", 0.5, 42, 90.0, "11:00"),
            _run("cola", "dense", None, 1, 300.0, "09:00")]
    rows = glue_cost.side_by_side_table(runs)
    assert rows[2] == "| SST2 | 42 | rankdyna 0.5 | 11:00 | 80.0 | 90 |  |  |  |  |"  # no dense beside it: no ratio
    assert rows[3].startswith("| COLA | 1 | dense | 09:00 |")  # another seed's dense does not enter seed 42's mean
    assert rows[4].startswith("| COLA | 42 | dense | 10:00 | 80.0 | 140 | 0.93 |")
    assert rows[5] == ("| COLA | 42 | rankdyna 0.2 | 10:05 | 80.0 | 120 | 0.80 | 200 / 150 / 100 | 180 / 130 / 90 | "
                       "2.5 |")
    assert rows[6].startswith("| COLA | 42 | dense | 10:10 | 80.0 | 160 | 1.07 |")
