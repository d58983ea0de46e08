"""The GLUE benchmark's summary and page, from run files (experiment/glue_report.py)."""

import json
import statistics

import pytest

from rankdyna_trainer.experiment import glue_report

FLOORS = {"sst2": 50.9, "mrpc": 81.2, "cola": 0.0, "rte": 52.7}


def run_record(task, method, budget, seed, score, total_s=100.0, rank_multiple=1):
    """A run file as scripts/benchmark_glue.py writes it (the fields the summary and page read)."""
    post_hoc = method in ("svd", "fwsvd", "tfwsvd", "ars")
    wall = ({"first_round_s": 60.0, "compress_s": 5.0, "fine_tune_s": total_s - 65.0, "total_s": total_s} if post_hoc
            else {"fine_tune_s": total_s, "export_s": 0.0, "total_s": total_s})
    protocol = {"train_rows": None, "train_rows_used": 100, "epochs": 3.0, "max_seq_length": 128,
                "learning_rate": 1e-4, "batch_size": 32, "warmup_ratio": 0.06, "weight_decay": 0.01,
                "sampling": "group_by_length", "adalora_learning_rate": 1e-3, "fisher_batches": 32, "ars_steps": 80,
                "ars_learning_rate": 1e-2, "als_iterations": 5, "rankdyna_interval": 10,
                "metric": {"mrpc": "f1", "cola": "mcc"}.get(task, "accuracy")}
    return {"task": task, "method": method, "budget": None if method in ("dense", "adalora") else budget,
            "rank_multiple": rank_multiple, "seed": seed, "score": score, "wall_time": wall, "protocol": protocol,
            "floor": {"metric": protocol["metric"], "score": FLOORS[task]},
            "device": {"type": "cpu", "name": "test CPU", "threads": 2},
            "versions": {"torch": "x"}, "command": "python scripts/benchmark_glue.py --seeds 42 1 2",
            "config": ({"ffn_groups": "channels", "attention_groups": "channels"}
                       if method in ("rankdyna", "rankdyna_equal") else {})}


def write_runs(folder, records):
    for r in records:
        budget = "na" if r["budget"] is None else f"{r['budget']:g}"
        path = folder / r["task"] / f"{r['method']}_b{budget}_seed{r['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))


def campaign():
    records = []
    for task, dense in [("sst2", 86.0), ("mrpc", 86.0), ("cola", 30.0), ("rte", 57.0)]:
        for seed, noise in zip((42, 1, 2), (-1.0, 0.0, 1.5)):
            records.append(run_record(task, "dense", None, seed, dense + noise))
            records.append(run_record(task, "rankdyna", 0.5, seed, dense - 2 + noise))
        records.append(run_record(task, "svd", 0.5, 42, dense - 5, total_s=200.0))
    records.append(run_record("rte", "svd", 0.33, 42, 50.0))  # one task only
    return records


def test_summary_has_the_schema_and_mean_std_n_of_the_run_files(tmp_path):
    write_runs(tmp_path, campaign())
    write_runs(tmp_path / "cola", [])  # an empty folder changes nothing
    (tmp_path / "latency.json").write_text(json.dumps({"layouts": {}}))  # not a run file
    summary = glue_report.summarize(glue_report.read_run_files(str(tmp_path)))

    assert set(summary) == {"majority", "runs"}
    assert summary["majority"] == {"sst2": 50.9, "mrpc": 81.2, "cola": 0.0, "rte": 52.7}
    assert list(summary["runs"]) == ["dense@1.0", "rankdyna@0.5", "svd@0.5", "svd@0.33"]
    rte = summary["runs"]["dense@1.0"]["rte"]
    assert rte == {"mean": pytest.approx(statistics.fmean([56.0, 57.0, 58.5])),
                   "std": pytest.approx(statistics.stdev([56.0, 57.0, 58.5]), abs=1e-4), "n": 3}
    assert summary["runs"]["svd@0.5"]["cola"] == {"mean": 25.0, "std": 0.0, "n": 1}
    assert list(summary["runs"]["svd@0.33"]) == ["rte"]
    json.dumps(summary)  # plain JSON


def test_retention_averages_only_complete_rows_and_missing_cells_are_listed():
    summary = glue_report.summarize(campaign())
    kept = glue_report.retention(summary)
    dense_means = [d + 0.5 / 3 for d in (86.0, 86.0, 30.0, 57.0)]  # seeds' noise -1, 0, 1.5
    assert kept["rankdyna@0.5"]["rte"] == pytest.approx((dense_means[3] - 2) / dense_means[3])
    assert kept["rankdyna@0.5"]["average"] == pytest.approx(statistics.fmean([(d - 2) / d for d in dense_means]))
    assert "average" not in kept["svd@0.33"]
    missing = glue_report.missing_cells(summary, ["sst2", "mrpc", "cola", "rte"], [0.5, 0.33])
    assert "`fwsvd@0.5` needs n=3: SST2 (n=0), MRPC (n=0), COLA (n=0), RTE (n=0)" in missing
    assert "`svd@0.33` needs n=1: SST2 (n=0), MRPC (n=0), COLA (n=0)" in missing
    assert not any(m.startswith("`dense@1.0`") or m.startswith("`rankdyna@0.5`") for m in missing)


def test_rank_multiple_runs_are_their_own_rows():
    records = [run_record("rte", "rankdyna", 0.5, 42, 55.0), run_record("rte", "rankdyna", 0.5, 42, 54.0,
                                                                         rank_multiple=8)]
    assert list(glue_report.summarize(records)["runs"]) == ["rankdyna@0.5", "rankdyna+m8@0.5"]


@pytest.mark.parametrize("field,other,tag", [("ffn_groups", "attention_groups", "+singular"),
                                              ("attention_groups", "ffn_groups", "+attn_singular")])
def test_rankdyna_with_singular_groups_is_its_own_row(field, other, tag):
    singular = run_record("rte", "rankdyna", 0.5, 42, 53.0)
    singular["config"] = {field: "singular", other: "channels"}
    before_the_field = run_record("rte", "rankdyna", 0.33, 42, 52.0)
    before_the_field["config"] = {other: "channels"}  # runs from before the field existed used singular groups
    records = [run_record("rte", "rankdyna", 0.5, 42, 55.0), singular, before_the_field]
    assert list(glue_report.summarize(records)["runs"]) == ["rankdyna@0.5", f"rankdyna{tag}@0.5",
                                                            f"rankdyna{tag}@0.33"]


def test_page_and_plot_come_from_the_summary(tmp_path):
    records = campaign()
    summary = glue_report.summarize(records)
    glue_report.plot_retention(summary, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    page = glue_report.render_report(summary, records, "plot.png", "docs/results_glue.json", budgets=[0.5, 0.33],
                                     notes={"rte/dense_bna_seed1.json": "wall time includes a pause"})
    assert "- `rte/dense_bna_seed1.json`: wall time includes a pause" in page
    assert "| rankdyna | 0.5 | 84.2 ± 1.3 | 84.2 ± 1.3 | 28.2 ± 1.3 | 55.2 ± 1.3 |" in page
    assert "| svd | 0.5 | 81.0 (n=1) |" in page
    assert "![average retention against budget](plot.png)" in page
    assert "`fwsvd@0.33` needs n=3" in page
    assert "python scripts/benchmark_glue.py --seeds 42 1 2" in page


def test_latency_table_reports_fraction_of_ideal_and_the_target():
    def layout(ms, flops, multiple=1, profile=None):
        return {"median_ms": ms, "flops": flops, "params_fraction": flops / 100, "rank_multiple": multiple,
                "profile": profile}

    latency = {"rounds": 3, "batch_size": 2, "seq_len": 16, "device": "cpu", "threads": 1, "command": "python x",
               "layouts": {"dense": layout(100.0, 100, profile={"matmul_ms": 80.0, "other_ms": 20.0}),
                           "uniform@0.5": layout(60.0, 50, profile={"matmul_ms": 40.0, "other_ms": 20.0}),
                           "uniform+m8@0.5": layout(52.0, 50, 8),
                           "rankdyna@0.5 (sst2)": layout(54.0, 50),
                           "rankdyna@0.5 (sst2) rounded +m8": layout(50.0, 50, 8)}}
    lines = glue_report.latency_lines(latency)
    # speed-up 100/60 = 1.67 of ideal 2.0 -> 0.83; Amdahl bound 100 / (20 + 80 / 2) = 1.67 -> fraction of bound 1.00
    assert "| uniform@0.5 | 1 | 0.500 | 0.0 | 60 | 1.67 | 2.00 | 0.83 | 40 / 20 | 1.67 | 1.00 |" in lines
    assert ("- Budget 0.5: near-uniform ranks reach 0.83 of the ideal speed-up (misses the 0.9 target); rounded to "
            "multiples (m8: 0.96).") in lines
    # RankDyna's own layout: 100/54 = 1.85 of 2.0 -> 0.926 meets the target; rounded 100/50 / 2 = 1.0
    assert "  RankDyna's layout (sst2) reaches 0.926 (meets it); rounded (+m8: 1.00)." in lines


def test_runs_whose_clock_is_noted_as_unusable_keep_their_score_but_leave_the_wall_time_table(tmp_path):
    records = [run_record("sst2", "dense", None, 42, 85.0, total_s=100.0),
               run_record("sst2", "dense", None, 1, 86.0, total_s=2600.0),  # paused mid-run
               run_record("mrpc", "dense", None, 42, 85.0, total_s=3000.0),  # the only mrpc run, also paused
               run_record("sst2", "fwsvd", 0.5, 42, 84.0, total_s=250.0),
               run_record("mrpc", "fwsvd", 0.5, 42, 84.0, total_s=999.0)]  # no usable dense time to compare
    records[-1]["wall_time"]["first_round_s"] = 3000.0  # read from mrpc's dense run file, as the benchmark does
    records[0]["versions"] = {"torch": "x", "commit": "bbb"}
    for r in records[1:]:
        r["versions"] = {"torch": "x", "commit": "aaa"}
    write_runs(tmp_path, records)
    records = glue_report.read_run_files(str(tmp_path))
    assert sorted(r["file"] for r in records) == ["mrpc/dense_bna_seed42.json", "mrpc/fwsvd_b0.5_seed42.json",
                                                  "sst2/dense_bna_seed1.json", "sst2/dense_bna_seed42.json",
                                                  "sst2/fwsvd_b0.5_seed42.json"]
    notes = {"sst2/dense_bna_seed1.json": "wall time not usable: paused.",
             "mrpc/dense_bna_seed42.json": "Wall time overstated: shared the cores.",
             "sst2/dense_bna_seed42.json": "renamed from another file."}
    assert glue_report.wall_time_unusable(notes) == {"sst2/dense_bna_seed1.json", "mrpc/dense_bna_seed42.json"}
    summary = glue_report.summarize(records)
    assert summary["runs"]["dense@1.0"]["sst2"] == {"mean": 85.5, "std": pytest.approx(0.7071, abs=1e-4), "n": 2}
    page = glue_report.render_report(summary, records, "plot.png", "results.json", budgets=[0.5], notes=notes)
    assert "| dense | — | 100† | —† | 1.00 | 0 | 0 | 100 |" in page
    # mrpc's fwsvd run counts mrpc's overstated dense round as its first, so its clock leaves the table too
    assert glue_report.clock_unusable(records, notes) == {"sst2/dense_bna_seed1.json", "mrpc/dense_bna_seed42.json",
                                                          "mrpc/fwsvd_b0.5_seed42.json"}
    assert "| fwsvd | 0.5 | 250 | —† | 2.50 | 60 | 5 | 185 |" in page  # x dense on sst2 alone
    # a post-hoc run that trained its dense round again, because the saved model was gone, timed it itself
    retrained = next(r for r in records if r["file"] == "mrpc/fwsvd_b0.5_seed42.json")
    retrained["wall_time"]["first_round_s"] = 310.0
    assert glue_report.clock_unusable(records, notes) == {"sst2/dense_bna_seed1.json", "mrpc/dense_bna_seed42.json"}
    assert "Versions: torch x (commits aaa, bbb)." in page


def test_a_run_whose_measured_cpu_share_says_it_shared_the_cores_leaves_the_wall_time_table(tmp_path):
    records = [run_record("sst2", "dense", None, 42, 85.0, total_s=100.0),
               run_record("sst2", "rankdyna", 0.5, 42, 84.0, total_s=90.0),
               run_record("sst2", "rankdyna", 0.5, 1, 84.5, total_s=400.0),  # another job took the cores
               run_record("sst2", "dense", None, 1, 86.0, total_s=110.0)]
    records[0]["cpu_share"], records[1]["cpu_share"], records[2]["cpu_share"] = 0.99, 0.95, 0.5
    write_runs(tmp_path, records)  # the last has no cpu_share (written before it was measured): no verdict
    records = glue_report.read_run_files(str(tmp_path))
    assert glue_report.clock_unusable(records, None) == {"sst2/rankdyna_b0.5_seed1.json"}
    page = glue_report.render_report(glue_report.summarize(records), records, "plot.png", "results.json",
                                     budgets=[0.5])
    assert "| rankdyna | 0.5 | 90† | 0.90 | 0 | 0 | 90 |" in page  # seed 1's 400 s is left out, its score is not
    assert "| rankdyna | 0.5 | 84.2 ± 0.4 (n=2) |" in page


def test_times_dense_pairs_each_run_with_the_dense_run_of_its_seed():
    # seed 1 ran on a machine twice as slow: both its runs take twice as long
    records = [run_record("sst2", "dense", None, 42, 85.0, total_s=100.0),
               run_record("sst2", "dense", None, 1, 86.0, total_s=200.0),
               run_record("sst2", "rankdyna", 0.5, 42, 84.0, total_s=120.0),
               run_record("sst2", "rankdyna", 0.5, 1, 84.0, total_s=240.0),
               run_record("sst2", "svd", 0.5, 1, 80.0, total_s=300.0),  # one seed, on the slow machine
               run_record("mrpc", "dense", None, 42, 85.0, total_s=400.0),
               run_record("mrpc", "rankdyna", 0.5, 42, 84.0, total_s=800.0),
               run_record("mrpc", "svd", 0.5, 2, 80.0, total_s=999.0)]  # no dense run of seed 2: no ratio
    page = glue_report.render_report(glue_report.summarize(records), records, "plot.png", "results.json",
                                     budgets=[0.5])
    # svd@0.5: 300 / 200 (its seed's dense), not 300 / 150 (dense's mean over seeds); mrpc has no pair
    assert "| svd | 0.5 | 300 | 999 | 1.50 |" in page
    # rankdyna@0.5: 1.2 on sst2, 2.0 on mrpc, averaged over the tasks
    assert "| rankdyna | 0.5 | 180 | 800 | 1.60 |" in page
    assert "| dense | — | 150 | 400 | 1.00 |" in page


def test_times_dense_pairs_each_run_with_the_dense_run_of_its_session():
    """Rows re-run sessions later pair with the dense run re-timed beside them, never with the campaign's old one."""
    def at(record, day):
        return {**record, "finished": f"2026-11-{day:02d}T12:00:00+00:00"}

    campaign = [at(run_record("sst2", "dense", None, 42, 85.0, total_s=100.0), 1),
                at(run_record("sst2", "dense", None, 1, 86.0, total_s=100.0), 1),
                at(run_record("sst2", "fwsvd", 0.5, 42, 84.0, total_s=200.0), 1),
                at(run_record("sst2", "rankdyna", 0.5, 42, 84.0, total_s=54.0), 20),
                at(run_record("sst2", "rankdyna", 0.5, 1, 84.0, total_s=50.0), 20)]  # no dense run that day
    retimed = [at(run_record("sst2", "dense", None, 42, 85.5, total_s=60.0), 20)]
    page = glue_report.render_report(glue_report.summarize(campaign), campaign, "plot.png", "results.json",
                                     budgets=[0.5], dense_clocks=retimed)
    assert "| rankdyna | 0.5 | 52 | 0.90 |" in page  # 54 / 60; seed 1 has no dense run of its session
    assert "| fwsvd | 0.5 | 200 | 2.00 |" in page  # 200 / 100, the dense run of its own session
    page = glue_report.render_report(glue_report.summarize(campaign), campaign, "plot.png", "results.json",
                                     budgets=[0.5])
    assert "| rankdyna | 0.5 | 52 | — |" in page  # without the re-timed dense run: no ratio at all


def test_page_states_rankdyna_against_the_targets_and_flags_models_at_the_floor():
    records = campaign()
    dense_means = {t: statistics.fmean(r["score"] for r in records if r["task"] == t and r["method"] == "dense")
                   for t in FLOORS}
    records += [run_record(t, "fwsvd", 0.5, 42, dense_means[t] - 1.0) for t in FLOORS]
    summary = glue_report.summarize(records)
    page = glue_report.render_report(summary, records, "plot.png", "results.json", budgets=[0.5, 0.33])

    rankdyna = statistics.fmean((dense_means[t] - 2.0) / dense_means[t] for t in FLOORS)  # 2 points below dense
    fwsvd = statistics.fmean((dense_means[t] - 1.0) / dense_means[t] for t in FLOORS)
    assert (f"- Budget 0.5: RankDyna keeps **{100 * rankdyna:.1f} %** (misses 99 %); FWSVD keeps {100 * fwsvd:.1f} % "
            "(RankDyna behind on the average); ahead of FWSVD on no task, behind or level on SST2, MRPC, COLA, RTE "
            "(over the seeds both ran). *(provisional: fewer than 3 seeds in some cells)*") in page
    assert "- Budget 0.33: RankDyna's average is not measurable yet (SST2, MRPC, COLA, RTE missing)" in page
    # svd@0.5 is 5 points under dense (MRPC 81.0 against its 81.2 floor, RTE 52.0 against 52.7), svd@0.33 50.0 on
    # RTE; SST-2 and CoLA stay far above theirs.
    assert ("**At the floor** (less than 1 point above the constant prediction): svd@0.5 on MRPC (81.0); svd@0.5 on "
            "RTE (52.0); svd@0.33 on RTE (50.0). These models learned little or nothing of the task.") in page


def test_training_loss_table_averages_each_method_over_budgets_and_seeds():
    records = [run_record("sst2", "dense", None, seed, 85.0) for seed in (42, 1)]
    records += [run_record("sst2", "rankdyna", b, 42, 84.0) for b in (0.5, 0.33)]
    for r, loss in zip(records, (0.30, 0.20, 0.40, 0.50)):
        r["train_loss"] = loss
    page = glue_report.render_report(glue_report.summarize(records), records, "p.png", "r.json", budgets=[0.5])
    assert "| dense | 0.250 |" in page
    assert "| rankdyna | 0.450 |" in page
    assert "| fwsvd |" not in page.split("Mean training loss")[1].split("##")[0]  # no runs, no row


def test_rankdyna_against_fwsvd_pairs_runs_by_seed_and_ignores_a_seed_only_one_has():
    # RankDyna trails FWSVD by 1 point on seeds 42 and 1; its seed 2, which FWSVD lacks, is high enough that the
    # means of the two cells would put RankDyna ahead.
    records = [run_record("rte", "dense", None, seed, 57.0) for seed in (42, 1, 2)]
    records += [run_record("rte", "rankdyna", 0.2, seed, s) for seed, s in ((42, 54.0), (1, 50.0), (2, 70.0))]
    records += [run_record("rte", "fwsvd", 0.2, seed, s) for seed, s in ((42, 55.0), (1, 51.0))]
    records += [run_record("rte", "rankdyna", 0.5, 42, 58.0), run_record("rte", "svd", 0.2, 42, 40.0)]

    paired = glue_report.paired_differences(records)
    assert paired == {0.2: {"rte": [-1.0, -1.0]}}  # no FWSVD at 0.5, and SVD is not FWSVD
    summary = glue_report.summarize(records)
    assert summary["runs"]["rankdyna@0.2"]["rte"]["mean"] > summary["runs"]["fwsvd@0.2"]["rte"]["mean"]
    page = glue_report.render_report(summary, records, "p.png", "r.json", budgets=[0.2])
    assert "ahead of FWSVD on no task, behind or level on RTE (over the seeds both ran) (must be ahead here)" in page
    assert "| budget | RTE |\n|---|---|\n| 0.2 | -1.0 (0/2) |" in page  # only RTE was run


def test_a_control_folder_is_set_beside_the_campaigns_cells_with_floor_and_dense():
    variant = [run_record("cola", "rankdyna", 0.5, 42, 31.0), run_record("cola", "rankdyna", 0.5, 2, 33.0),
               run_record("sst2", "svd", 0.5, 42, 80.0)]  # not the compared method: no row of its own
    lines = glue_report.control_table(campaign(), {"late start": variant}, against="svd")
    assert lines[0] == "| cell | floor | dense | rankdyna (campaign) | late start | svd |"
    assert len(lines) == 3  # header, separator, the one cell the variant ran
    dense = statistics.fmean([29.0, 30.0, 31.5])
    campaign_mean = statistics.fmean([27.0, 28.0, 29.5])
    assert lines[2] == (f"| COLA @ 0.5 | 0.0 | {dense:.1f} | 27.0 / 28.0 / 29.5 (**{campaign_mean:.1f}**)"
                        " | 31.0 / · / 33.0 | 25.0 / · / · |")


def test_average_retention_of_one_seed_or_of_some_tasks():
    records = campaign()
    # rankdyna is dense - 2 on every task and seed: its retention is the mean of (d - 2) / d.
    seed42 = glue_report.average_retention(records, seed=42)
    dense42 = {"sst2": 85.0, "mrpc": 85.0, "cola": 29.0, "rte": 56.0}
    assert seed42["rankdyna@0.5"] == pytest.approx(statistics.fmean((d - 2) / d for d in dense42.values()))
    assert seed42["svd@0.5"] == pytest.approx(statistics.fmean((d + 1 - 5) / d for d in dense42.values()))
    two = glue_report.average_retention(records, tasks=["sst2", "cola"])
    means = [86.0 + 0.5 / 3, 30.0 + 0.5 / 3]
    assert two["rankdyna@0.5"] == pytest.approx(statistics.fmean((m - 2) / m for m in means))
    assert "svd@0.33" not in two  # RTE only: no row over these tasks
