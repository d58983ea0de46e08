"""scripts/benchmark_glue.py: one resumable run file per run, and the summary and page rebuilt from the files."""

import json
import os

import pytest
import torch

from tests.experiment.test_glue_report import campaign, write_runs

from .test_glue_table import _load_script


def _paths(tmp_path):
    return ["--results_dir", str(tmp_path / "runs"), "--models_dir", str(tmp_path / "models"),
            "--summary", str(tmp_path / "docs" / "results_glue.json"), "--report", str(tmp_path / "docs" / "R.md")]


@pytest.fixture
def small_model(tmp_path, minilm_dir):
    """A 2-layer, width-32 BERT with MiniLM's tokenizer: the benchmark's real code path in seconds."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path / "small"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(folder)
    return str(folder)


def test_existing_run_files_are_skipped_without_loading_anything(tmp_path, capsys):
    bench = _load_script("benchmark_glue")
    write_runs(tmp_path / "runs", campaign())
    before = {p: os.path.getmtime(p) for p in (tmp_path / "runs").rglob("*.json")}
    # --model points nowhere: a run that was not skipped would fail to load it.
    bench.main(["--tasks", "rte", "cola", "--methods", "dense", "rankdyna", "--budgets", "0.5", "--no_report",
                "--model", str(tmp_path / "no_model")] + _paths(tmp_path))
    out = capsys.readouterr().out
    assert out.count("[skip]") == 12 and "[run]" not in out  # 2 tasks x 3 seeds x (dense, rankdyna)
    assert before == {p: os.path.getmtime(p) for p in (tmp_path / "runs").rglob("*.json")}


def test_a_real_run_writes_its_file_and_the_post_hoc_run_reuses_the_dense_round(tmp_path, glue_dir, small_model,
                                                                                capsys):
    bench = _load_script("benchmark_glue")
    argv = ["--tasks", "cola", "--methods", "dense", "svd", "--budgets", "0.33", "--seeds", "7", "--limit", "48",
            "--epochs", "1", "--rank_multiple", "4", "--glue_dir", glue_dir, "--model", small_model,
            "--device", "cpu", "--same_process"] + _paths(tmp_path)
    bench.main(argv)
    runs = tmp_path / "runs" / "cola"
    dense = json.loads((runs / "dense_bna_seed7.json").read_text())
    svd = json.loads((runs / "svd+m4_b0.33_seed7.json").read_text())
    assert dense["score"] == pytest.approx(100 * dense["metrics"]["mcc"])  # CoLA: Matthews correlation
    assert dense["floor"] == {"metric": "mcc", "score": 0.0, "dev_majority_class": 1}
    assert dense["device"]["type"] == "cpu" and dense["versions"]["torch"] == torch.__version__
    assert dense["protocol"]["max_seq_length"] == 64 and dense["protocol"]["train_rows_used"] == 48
    assert svd["wall_time"]["first_round_s"] == dense["wall_time"]["fine_tune_s"]
    assert svd["wall_time"]["total_s"] == pytest.approx(sum(svd["wall_time"][k] for k in
                                                            ("first_round_s", "compress_s", "fine_tune_s")))
    assert svd["dense_model"] == "saved dense model of this seed"
    assert all(r % 4 == 0 for r in svd["ranks"].values())
    assert svd["targeted_params"] <= 0.33 * svd["targeted_dense_params"]
    summary = json.loads((tmp_path / "docs" / "results_glue.json").read_text())
    assert summary["runs"]["dense@1.0"]["cola"]["n"] == 1 and "svd+m4@0.33" in summary["runs"]

    # Resumed with the dense model folder gone (a fresh machine): the dense round is trained again for svd.
    (runs / "svd+m4_b0.33_seed7.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "models")
    # A dense file whose round time is unusable (e.g. the process was paused): the re-trained round's own time counts.
    dense_file = runs / "dense_bna_seed7.json"
    dense = json.loads(dense_file.read_text())
    dense["wall_time"]["fine_tune_s"] = 1e6
    dense_file.write_text(json.dumps(dense))
    capsys.readouterr()
    bench.main(argv)
    out = capsys.readouterr().out
    assert "[skip] cola dense" in out and "[run] cola svd+m4" in out
    again = json.loads((runs / "svd+m4_b0.33_seed7.json").read_text())
    assert again["dense_model"].startswith("dense round trained again")
    assert 0 < again["wall_time"]["first_round_s"] < 1e6


def test_rankdyna_runs_ffn_channels_and_singular_groups_as_separate_rows(tmp_path, glue_dir, small_model):
    bench = _load_script("benchmark_glue")
    # 128 rows: 4 steps, so that the default warm-up (0.3) and the control's final 0.5 leave a step to prune in.
    # Singular groups in the attention: the latency layouts below rebuild only those (attention channels: their own
    # test below).
    argv = ["--tasks", "cola", "--methods", "rankdyna", "--budgets", "0.5", "--seeds", "7", "--limit", "128",
            "--epochs", "1", "--glue_dir", glue_dir, "--model", small_model, "--device", "cpu",
            "--rankdyna_attention_groups", "singular", "--same_process"] + _paths(tmp_path)
    bench.main(argv)
    run = json.loads((tmp_path / "runs" / "cola" / "rankdyna+attn_singular_b0.5_seed7.json").read_text())
    assert run["config"]["ffn_groups"] == "channels"  # the campaign's recipe by default
    # The run file records the config resolved for this model and run: no 'auto' left.
    assert run["config"]["warmup_fraction"] == 0.3 and run["config"]["reallocation_interval"] == 1
    assert run["config"]["factor_scaling"] == "group" and "auto" not in run["config"].values()
    assert 0 <= run["ranks"]["bert.encoder.layer.0.output.dense"] <= 64  # kept intermediate channels
    assert "bert.encoder.layer.0.intermediate.dense" not in run["ranks"]  # sliced with its reader, not factorized
    assert run["targeted_params"] <= 0.5 * run["targeted_dense_params"]
    bench.main(argv + ["--rankdyna_ffn_groups", "singular"])
    singular = json.loads((tmp_path / "runs" / "cola" / "rankdyna+singular+attn_singular_b0.5_seed7.json").read_text())
    assert singular["config"]["ffn_groups"] == "singular"
    assert "bert.encoder.layer.0.intermediate.dense" in singular["ranks"]
    summary = json.loads((tmp_path / "docs" / "results_glue.json").read_text())
    assert {"rankdyna+attn_singular@0.5", "rankdyna+singular+attn_singular@0.5"} <= set(summary["runs"])
    control = tmp_path / "schedule_control"
    bench.main(argv + ["--rankdyna_final_fraction", "0.5", "--no_report", "--results_dir", str(control)])
    controlled = json.loads((control / "cola" / "rankdyna+attn_singular_b0.5_seed7.json").read_text())
    assert controlled["config"]["final_fraction"] == 0.5

    # Exported speed: both layouts are rebuilt, counted as the runs counted them, and timed beside dense.
    shapes, ffns = bench.target_shapes(small_model)
    for record in (run, singular):
        assert bench.params_fraction(record["ranks"], shapes, ffns) == pytest.approx(
            record["targeted_params"] / record["targeted_dense_params"])
    ffn_outputs = {out for out in ffns if ".attention." not in out}  # ffns: the attentions' channel readers too
    assert set(bench.channel_ffns(run["ranks"], ffns)) == ffn_outputs
    assert not bench.channel_ffns(singular["ranks"], ffns)
    rounded = bench.rounded_ranks(run["ranks"], shapes, 0.5, 8, ffns)
    assert all(r % 8 == 0 for r in rounded.values()) and bench.params_fraction(rounded, shapes, ffns) <= 0.5
    sliced = bench.layout_model(small_model, run["ranks"], ffns, "cpu")
    kept = run["ranks"]["bert.encoder.layer.0.output.dense"]
    assert sliced.bert.encoder.layer[0].intermediate.dense.out_features == kept
    assert sliced.bert.encoder.layer[0].output.dense.in_features == kept
    bench.main(["--no_runs", "--no_report", "--latency_rounds", "1", "--budgets", "0.5", "--model", small_model,
                "--device", "cpu"] + _paths(tmp_path))
    layouts = json.loads((tmp_path / "runs" / "latency.json").read_text())["layouts"]
    timed = layouts["rankdyna+attn_singular@0.5 (cola)"]
    assert timed["params_fraction"] == pytest.approx(bench.params_fraction(run["ranks"], shapes, ffns))
    assert timed["flops"] < layouts["dense"]["flops"] and timed["median_ms"] > 0
    assert "rankdyna+singular+attn_singular@0.5 (cola) rounded +m8" in layouts


def test_rankdyna_runs_attention_channels_by_default(tmp_path, glue_dir, small_model):
    bench = _load_script("benchmark_glue")
    argv = ["--tasks", "cola", "--methods", "rankdyna", "--budgets", "0.5", "--seeds", "7", "--limit", "128",
            "--epochs", "1", "--glue_dir", glue_dir, "--model", small_model, "--device", "cpu", "--no_report",
            "--same_process"] + _paths(tmp_path)
    bench.main(argv)
    run = json.loads((tmp_path / "runs" / "cola" / "rankdyna_b0.5_seed7.json").read_text())
    assert run["config"]["attention_groups"] == "channels" and run["config"]["ffn_groups"] == "channels"
    assert 0 <= run["ranks"]["bert.encoder.layer.0.attention.self.query"] <= 32  # kept q/k channels
    assert "bert.encoder.layer.0.attention.self.key" not in run["ranks"]  # sliced with the query
    assert run["targeted_params"] <= 0.5 * run["targeted_dense_params"]

    # Exported speed: the layout is rebuilt as export_model builds it and counted as the run counted it.
    from rankdyna_trainer.export import GatheredLinear, ScatteredLinear

    shapes, readers = bench.target_shapes(small_model)
    assert readers["bert.encoder.layer.0.attention.self.query"] == ["bert.encoder.layer.0.attention.self.key"]
    assert bench.params_fraction(run["ranks"], shapes, readers) == pytest.approx(
        run["targeted_params"] / run["targeted_dense_params"])
    layer = bench.layout_model(small_model, run["ranks"], readers, "cpu").bert.encoder.layer[0].attention
    qk, vo = run["ranks"]["bert.encoder.layer.0.attention.self.query"], run["ranks"][
        "bert.encoder.layer.0.attention.output.dense"]
    for module, kept in ((layer.self.query, qk), (layer.self.key, qk), (layer.self.value, vo)):
        assert isinstance(module, ScatteredLinear if kept < 32 else torch.nn.Linear) and module.weight.shape[0] == kept
    assert isinstance(layer.output.dense, GatheredLinear if vo < 32 else torch.nn.Linear)
    assert layer.output.dense.weight.shape[1] == vo
    bench.main(["--no_runs", "--no_report", "--latency_rounds", "1", "--budgets", "0.5", "--model", small_model,
                "--device", "cpu"] + _paths(tmp_path))
    timed = json.loads((tmp_path / "runs" / "latency.json").read_text())["layouts"]["rankdyna@0.5 (cola)"]
    assert timed["params_fraction"] == pytest.approx(bench.params_fraction(run["ranks"], shapes, readers))


@pytest.mark.parametrize("override", [["--epochs", "6"], ["--rankdyna_final_fraction", "0.5"],
                                      ["--rankdyna_warmup_fraction", "0.3"], ["--rankdyna_distillation_weight", "0.5"]])
def test_a_protocol_override_is_refused_in_the_campaigns_folder(override, capsys):
    bench = _load_script("benchmark_glue")
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(override + ["--tasks", "cola"])
    assert stopped.value.code == 2
    assert f"{override[0]}: a protocol override" in capsys.readouterr().err
    control = bench.parse_args(override + ["--results_dir", "benchmarks/glue_equal_time", "--no_report"])
    # The control keeps its dense rounds apart: a post-hoc control never starts from the campaign's dense model.
    assert control.models_dir.endswith(os.path.join("runs", "benchmark_glue_equal_time"))
    assert bench.parse_args([]).models_dir.endswith(os.path.join("runs", "benchmark_glue_protocol"))


def test_another_folders_runs_never_rewrite_the_campaigns_page(capsys):
    bench = _load_script("benchmark_glue")
    with pytest.raises(SystemExit):
        bench.parse_args(["--results_dir", "benchmarks/glue_equal_time", "--epochs", "6"])
    assert "--results_dir benchmarks/glue_equal_time" in capsys.readouterr().err
    assert bench.parse_args(["--results_dir", "benchmarks/glue_equal_time", "--epochs", "6", "--no_report"])
    assert bench.parse_args(["--report_only"]).results_dir == bench.CAMPAIGN_RESULTS


def test_a_final_fraction_that_leaves_no_steps_to_prune_names_the_flag(capsys):
    bench = _load_script("benchmark_glue")
    with pytest.raises(SystemExit):
        bench.parse_args(["--rankdyna_final_fraction", "0.95", "--results_dir", "elsewhere", "--no_report"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--rankdyna_final_fraction 0.95" in err and "must be below 1" in err
    with pytest.raises(SystemExit):  # each fraction is allowed alone, not together
        bench.parse_args(["--rankdyna_warmup_fraction", "0.5", "--rankdyna_final_fraction", "0.5",
                          "--results_dir", "x", "--no_report"])
    assert "--rankdyna_warmup_fraction 0.5 --rankdyna_final_fraction 0.5" in capsys.readouterr().err
    args = bench.parse_args(["--rankdyna_warmup_fraction", "0.3", "--results_dir", "x", "--no_report"])
    options = bench.rankdyna_options(args)
    assert options == {"warmup_fraction": 0.3}  # ffn_groups: the default gives channels on MiniLM


def test_distillation_options_reach_the_rankdyna_config_and_bad_ones_name_the_flag(capsys):
    bench = _load_script("benchmark_glue")
    control = ["--results_dir", "x", "--no_report"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--rankdyna_distillation_weight", "1.5"] + control)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--rankdyna_distillation_weight 1.5" in err and "must be a number in [0, 1]" in err
    args = bench.parse_args(["--rankdyna_distillation_weight", "0.5", "--rankdyna_distillation_temperature", "2",
                             "--rankdyna_warmup_fraction", "0.3"] + control)
    options = bench.rankdyna_options(args)
    assert options == {"warmup_fraction": 0.3, "distillation_weight": 0.5, "distillation_temperature": 2.0}


def test_report_only_regenerates_summary_and_page_from_the_files(tmp_path):
    bench = _load_script("benchmark_glue")
    write_runs(tmp_path / "runs", campaign())
    bench.main(["--report_only"] + _paths(tmp_path))
    summary_file, page_file = tmp_path / "docs" / "results_glue.json", tmp_path / "docs" / "R.md"
    first_summary, first_page = summary_file.read_text(), page_file.read_text()
    assert json.loads(first_summary)["runs"]["rankdyna@0.5"]["rte"]["n"] == 3
    assert (tmp_path / "docs" / "results_glue_retention.png").is_file()
    summary_file.unlink()
    page_file.unlink()
    bench.main(["--report_only"] + _paths(tmp_path))
    assert summary_file.read_text() == first_summary and page_file.read_text() == first_page


def test_rankdyna_equal_is_the_rankdyna_run_with_fwsvds_two_rounds_of_steps(tmp_path, glue_dir, small_model, capsys):
    bench = _load_script("benchmark_glue")
    argv = ["--tasks", "cola", "--methods", "rankdyna", "rankdyna_equal", "--budgets", "0.5", "--seeds", "7",
            "--limit", "96", "--epochs", "1", "--glue_dir", glue_dir, "--model", small_model,
            "--device", "cpu"] + _paths(tmp_path)
    bench.main(argv)  # each run in its own process (the default)
    runs = tmp_path / "runs" / "cola"
    one = json.loads((runs / "rankdyna_b0.5_seed7.json").read_text())
    equal = json.loads((runs / "rankdyna_equal_b0.5_seed7.json").read_text())
    assert one["command"] == equal["command"] == "python scripts/benchmark_glue.py " + " ".join(argv)
    # 96 rows in batches of 32: 3 steps an epoch (warm-up, one pruning step, the final step). --epochs 1 is the round
    # of every method: FWSVD trains 1 + 1 epochs (its dense round, then its own), rankdyna_equal 2 in its one run.
    assert (one["epochs"], one["optimizer_steps"]) == (1.0, 3)
    assert (equal["epochs"], equal["optimizer_steps"]) == (2.0, 6)
    assert equal["equal_work"] == {"runs": "rankdyna", "protocol_rounds": 2, "fwsvd_steps": 6}
    assert equal["protocol"] == one["protocol"] and equal["protocol"]["epochs"] == 1.0  # the task's round
    assert equal["config"] == one["config"] and equal["rounds"] == 1  # the same RankDyna run, one run
    assert equal["targeted_params"] <= 0.5 * equal["targeted_dense_params"]  # exported and reloaded as RankDyna
    assert set(equal["wall_time"]) == {"fine_tune_s", "export_s", "total_s"}
    for run in (one, equal):  # where the time went, from the run's own clocks
        cost = run["step_cost"]
        assert cost["steps"] == run["optimizer_steps"] and 0 < cost["train_s"] <= run["wall_time"]["fine_tune_s"]
        assert set(cost["step_part_s"]) == {"forward_backward", "optimizer", "after"}
        assert 0 < cost["rankdyna_hook_total_s"] < cost["train_s"] and len(cost["every_step_ms"]) == cost["steps"]
    summary = json.loads((tmp_path / "docs" / "results_glue.json").read_text())
    assert {"rankdyna@0.5", "rankdyna_equal@0.5"} <= set(summary["runs"])
    assert "| COLA | 1 | 3 | 3 + 3 = 6 | 6 |" in (tmp_path / "docs" / "R.md").read_text()
    capsys.readouterr()
    bench.main(argv + ["--no_report"])  # resumes: both files exist
    assert capsys.readouterr().out.count("[skip]") == 2


def test_a_run_that_fails_in_its_own_process_stops_the_campaign_naming_the_run(tmp_path, glue_dir):
    bench = _load_script("benchmark_glue")
    with pytest.raises(SystemExit, match="the run of cola dense budget None seed 7 failed in its own process"):
        bench.main(["--tasks", "cola", "--methods", "dense", "--seeds", "7", "--limit", "32", "--glue_dir", glue_dir,
                    "--model", str(tmp_path / "no_model"), "--device", "cpu", "--no_report"] + _paths(tmp_path))
    assert not list((tmp_path / "runs").rglob("*.json"))


def test_rankdyna_equal_refuses_a_fractional_round(capsys):
    bench = _load_script("benchmark_glue")
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "rankdyna_equal", "--epochs", "1.5", "--results_dir", "x", "--no_report"])
    assert "--epochs 1.5 with rankdyna_equal" in capsys.readouterr().err
    assert bench.parse_args(["--methods", "rankdyna", "--epochs", "1.5", "--results_dir", "x", "--no_report"])
    assert "rankdyna_equal" in bench.parse_args([]).methods  # the whole campaign has the equal-steps rows


def test_the_default_reallocation_interval_is_10_on_every_protocol_task(glue_dir):
    """The campaign's rankdyna rows pass no interval: RankDynaConfig's 'auto' gives the protocol's 10 on every task."""
    from rankdyna_trainer import RankDynaConfig
    from rankdyna_trainer.budget import ParameterBudget
    from rankdyna_trainer.experiment.glue_data import load_glue
    from rankdyna_trainer.methods.rankdyna.defaults import ENCODER, kind_defaults, reallocation_interval_for

    bench = _load_script("benchmark_glue")
    warmup, final = kind_defaults(ENCODER, 0.5)["warmup_fraction"], RankDynaConfig().final_fraction
    for task in bench.PROTOCOL:
        protocol = bench.task_protocol(bench.parse_args([]), task)
        rows = len(load_glue(task, glue_dir)["train"])
        rows = min(rows, protocol["train_rows"] or rows)
        steps = bench.optimizer_steps({"train": range(rows)}, protocol)
        budget = ParameterBudget.from_fractions(1000, 1.0, 0.5, steps, warmup, final)
        assert reallocation_interval_for(budget.final_start - budget.warmup_steps) == 10, (task, steps)
    assert bench.SHARED["rankdyna_interval"] == 10


def test_the_rankdyna_row_is_the_library_default_plus_the_command_lines_options():
    from rankdyna_trainer import RankDynaConfig

    bench = _load_script("benchmark_glue")
    protocol = bench.task_protocol(bench.parse_args([]), "cola")
    default = bench.method_config_for("rankdyna", 0.33, protocol, 1, 100, None, bench.rankdyna_options(
        bench.parse_args([])))
    assert default.to_dict() == RankDynaConfig(target_budget=0.33).to_dict()
    args = bench.parse_args(["--rankdyna_warmup_fraction", "0.1", "--rankdyna_ffn_groups", "singular",
                             "--results_dir", "x", "--no_report"])
    control = bench.method_config_for("rankdyna", 0.33, protocol, 8, 100, None, bench.rankdyna_options(args))
    assert control.to_dict() == RankDynaConfig(target_budget=0.33, warmup_fraction=0.1, ffn_groups="singular",
                                               rank_multiple=8).to_dict()
    attention = bench.method_config_for("rankdyna", 0.33, protocol, 1, 100, None, bench.rankdyna_options(
        bench.parse_args(["--rankdyna_attention_groups", "singular"])))
    assert attention.to_dict() == RankDynaConfig(target_budget=0.33, attention_groups="singular").to_dict()
