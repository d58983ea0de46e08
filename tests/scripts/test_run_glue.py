"""scripts/run_glue.py driven through its main() with real arguments, real GLUE files and the packaged MiniLM."""

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from rankdyna_trainer import read_compression_config
from rankdyna_trainer.experiment.glue_data import load_glue
from tests.wandb_records import history_rows, offline_run_files

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


run_glue = _load_script("run_glue")

# MiniLM on a few short examples: 48 train rows / batch 8 = 6 optimizer steps.
TINY = ["--model_name_or_path", "minilm", "--max_seq_length", "32", "--max_train_samples", "48",
        "--max_eval_samples", "16", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--num_train_epochs", "1", "--learning_rate", "1e-4", "--logging_steps", "2", "--save_strategy", "no",
        "--dataloader_pin_memory", "false", "--disable_tqdm", "true"]
MINILM_TARGET_PARAMS = 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # 6 layers: q, k, v, attn-out (h x h) + FFN in/out


def _offline_runs(tmp_path) -> list[str]:
    import wandb

    wandb.teardown()  # wandb-core writes run files asynchronously; shutting it down waits for the writes
    return offline_run_files(str(tmp_path / "wandb"))


def _history(tmp_path) -> list[dict]:
    runs = _offline_runs(tmp_path)
    assert len(runs) == 1, runs
    return history_rows(runs[0])


def test_rankdyna_on_pair_task_trains_compresses_saves_and_evaluates(glue_dir, minilm_dir, tmp_path):
    out = tmp_path / "rte-rankdyna"
    results = run_glue.main(["--task_name", "rte", "--glue_dir", glue_dir, *TINY, "--rankdyna",
                             "--rankdyna_budget", "0.5", "--rankdyna_reallocation_interval", "2",
                             "--do_train", "--do_eval", "--report_to", "wandb", "--output_dir", str(out)])

    evals = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= evals["eval_accuracy"] <= 1.0 and evals["eval_samples"] == 16
    assert all(key.startswith("eval_") for key in evals), evals  # no training-time rankdyna/* or epoch values

    # The rank pattern ends within the budget, counted independently from the model's shapes.
    pattern = json.loads((out / "rank_pattern.json").read_text())
    assert pattern["dense_params"] == MINILM_TARGET_PARAMS
    assert pattern["budget_params"] == int(0.5 * MINILM_TARGET_PARAMS)
    assert pattern["params"] <= pattern["budget_params"]
    # The defaults on BERT ('auto'): each FFN by its channels, each attention by its q/k channels (the query's entry;
    # the key is sliced with it) and v/o channels (the attention output's entry; the value is sliced with it).
    ffn = {n: r for n, r in pattern["ranks"].items() if n.endswith(".output.dense") and "attention" not in n}
    assert len(pattern["ranks"]) == 18 and len(ffn) == 6 and all(0 <= r <= 1536 for r in ffn.values())
    assert sum(n.endswith("attention.self.query") for n in pattern["ranks"]) == 6
    assert all(0 <= r <= 384 for n, r in pattern["ranks"].items() if n not in ffn)

    # The saved compressed model holds that many weights in its targeted matrices, and reloads natively.
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    layout = read_compression_config(str(out))["modules"]
    stored = sum(p.numel() for name in layout for pname, p in model.get_submodule(name).named_parameters()
                 if pname != "bias")
    assert stored == results["compression"]["compressed_params"] <= pattern["budget_params"]

    # eval_results.json is the accuracy of the model on disk, recomputed here by hand.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    dev = load_glue("rte", glue_dir)["validation"].select(range(16))
    batch = tokenizer(list(dev["sentence1"]), list(dev["sentence2"]), truncation=True, max_length=32, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    by_hand = (predicted == torch.tensor(list(dev["label"]))).float().mean().item()
    assert evals["eval_accuracy"] == pytest.approx(by_hand)

    png = out / "rank_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    card = (out / "README.md").read_text()  # the model card: method, budget, kept, metric beside the floor
    assert "| target budget | 0.5 of the targeted weights |" in card
    assert f"{stored:,} of {MINILM_TARGET_PARAMS:,}" in card and "![kept rank per matrix](rank_heatmap.png)" in card
    assert f"| dev accuracy | {100 * evals['eval_accuracy']:.1f} (dense model: —; constant-prediction floor:" in card

    rows = _history(tmp_path)
    logged = {key for row in rows for key in row}
    for key in ("train/rankdyna/budget_params", "train/rankdyna/params", "train/rankdyna/params_fraction",
                "eval/accuracy", "export/compressed_params", "export/model_file_mb"):
        assert key in logged, key
    assert any(k.startswith("rankdyna/rank_heatmap/") for k in logged)  # one image per logging step
    assert any(k.startswith("rankdyna/rank_pattern/") for k in logged)  # the final table
    budgets = [row["train/rankdyna/budget_params"] for row in rows if "train/rankdyna/budget_params" in row]
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == pattern["budget_params"]


def test_rankdyna_with_ffn_channels_from_the_command_line(glue_dir, minilm_dir, tmp_path):
    out = tmp_path / "rte-channels"
    results = run_glue.main(["--task_name", "rte", "--glue_dir", glue_dir, *TINY, "--rankdyna",
                             "--rankdyna_budget", "0.5", "--rankdyna_ffn_groups", "channels",
                             "--rankdyna_reallocation_interval", "1", "--do_train", "--do_eval", "--report_to", "wandb",
                             "--output_dir", str(out)])
    pattern = json.loads((out / "rank_pattern.json").read_text())
    assert pattern["dense_params"] == MINILM_TARGET_PARAMS and pattern["params"] <= pattern["budget_params"]
    assert len(pattern["ranks"]) == 18 and 0 <= pattern["ranks"]["bert.encoder.layer.0.output.dense"] <= 1536
    # The summary counts against the dense shapes, though the FFN layers were narrowed at export.
    assert results["compression"]["dense_params"] == MINILM_TARGET_PARAMS
    assert results["compression"]["compressed_params"] == pattern["params"]
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    ffn = model.bert.encoder.layer[0]
    width = pattern["ranks"]["bert.encoder.layer.0.output.dense"]
    assert ffn.intermediate.dense.out_features == ffn.output.dense.in_features == width
    assert (out / "rank_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {key for row in _history(tmp_path) for key in row}
    assert any(k.startswith("rankdyna/rank_pattern/") for k in logged)  # the W&B table has every gated layer


def test_dense_single_sentence_task(glue_dir, minilm_dir, tmp_path):
    out = tmp_path / "sst2-dense"
    results = run_glue.main(["--task_name", "sst2", "--glue_dir", glue_dir, *TINY, "--do_train", "--do_eval",
                             "--report_to", "wandb", "--output_dir", str(out)])
    evals = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= evals["eval_accuracy"] <= 1.0 and evals["eval_samples"] == 16
    assert results["train"]["train_samples"] == 48
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "compression_config.json").exists() and not (out / "rank_heatmap.png").exists()
    logged = {key for row in _history(tmp_path) for key in row}
    assert "eval/accuracy" in logged and not any("rankdyna" in k for k in logged)


def test_regression_task_from_explicit_files(glue_dir, minilm_dir, tmp_path):
    # No STS-B data ships here: build a small file in its GLUE layout from RTE sentences with made-up scores.
    rte = load_glue("rte", glue_dir, limit=24)["train"]
    lines = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    lines += [f"{i}\tx\tx\tx\tx\tx\tx\t{a}\t{b}\t{(i * 7) % 6:.1f}"
              for i, (a, b) in enumerate(zip(rte["sentence1"], rte["sentence2"]))]
    tsv = tmp_path / "stsb.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "stsb"
    results = run_glue.main(["--task_name", "stsb", "--train_file", str(tsv), "--validation_file", str(tsv),
                             *TINY, "--do_train", "--do_eval", "--output_dir", str(out)])
    assert -1.0 <= results["eval"]["eval_pearson"] <= 1.0 and -1.0 <= results["eval"]["eval_spearmanr"] <= 1.0
    assert results["eval"]["eval_samples"] == 16


def test_hyperparameter_search_runs_optuna_trials_as_wandb_runs(glue_dir, minilm_dir, tmp_path):
    out = tmp_path / "search"
    tiny = TINY + ["--max_train_samples", "32"]  # 4 steps per trial
    results = run_glue.main(["--task_name", "rte", "--glue_dir", glue_dir, *tiny, "--rankdyna",
                             "--hyperparameter_search", "2", "--report_to", "wandb", "--output_dir", str(out)])
    best = json.loads((out / "best_run.json").read_text())
    assert best == results["search"] and best["objective"] == "eval_accuracy" and 0 <= best["best_value"] <= 1
    space = yaml.safe_load((REPO / "scripts" / "sweep_rankdyna.yaml").read_text())["parameters"]
    assert set(best["best_hyperparameters"]) == set(space)
    assert best["best_hyperparameters"]["rankdyna_budget"] in space["rankdyna_budget"]["values"]
    lr = space["learning_rate"]
    assert lr["min"] <= best["best_hyperparameters"]["learning_rate"] <= lr["max"]
    runs = _offline_runs(tmp_path)
    assert len(runs) == 2  # one W&B run per trial
    for run in runs:
        logged = {key for row in history_rows(run) for key in row}
        assert {"train/rankdyna/params_fraction", "eval/accuracy"} <= logged


def test_sweep_config_parses_and_names_run_glue_arguments():
    sweep = yaml.safe_load((REPO / "scripts" / "sweep_rankdyna.yaml").read_text())
    assert Path(sweep["program"]).name == "run_glue.py" and (REPO / sweep["program"]).is_file()
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["goal"] == "maximize"
    assert sweep["metric"]["name"] == "eval/accuracy"  # RTE's GLUE metric as WandbCallback names it
    fields = {f.name for cls in run_glue.ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    assert set(sweep["parameters"]) <= fields
    # The fixed part of the command, plus one value per parameter as `wandb agent` passes them, parses.
    fixed = [a for a in sweep["command"] if a.startswith("--")]
    swept = [f"--{name}={spec['values'][0] if 'values' in spec else spec['min']}"
             for name, spec in sweep["parameters"].items()]
    model_args, data_args, rankdyna_args, _, training_args = run_glue.parse_args(fixed + swept)
    assert rankdyna_args.rankdyna and data_args.task_name == "rte" and "wandb" in training_args.report_to
    assert rankdyna_args.to_config().target_budget == sweep["parameters"]["rankdyna_budget"]["values"][0]


def test_minilm_alias_resolves_to_packaged_model(minilm_dir):
    assert run_glue.resolve_model_path("minilm") == minilm_dir
    assert run_glue.resolve_model_path("/some/folder") == "/some/folder"


# -- bad input: clear errors before any model is loaded ------------------------------------------------------------
def _argv(tmp_path, *extra):
    return ["--model_name_or_path", "minilm", "--do_train", "--output_dir", str(tmp_path / "out"), *extra]


UsageError = run_glue.UsageError


def test_unknown_task_name(tmp_path):
    with pytest.raises(UsageError, match=r"^--task_name: Unknown GLUE task 'sst3'.*'sst2'"):
        run_glue.main(_argv(tmp_path, "--task_name", "sst3"))


def test_budget_flag_without_rankdyna(tmp_path, glue_dir):
    with pytest.raises(UsageError, match=r"--rankdyna_budget only take effect with --rankdyna"):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--glue_dir", glue_dir, "--rankdyna_budget", "0.3"))


def test_invalid_budget_with_rankdyna(tmp_path, glue_dir):
    with pytest.raises(UsageError, match=r"^--rankdyna_budget must be in \(0, 1\], got 1.5"):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--glue_dir", glue_dir, "--rankdyna",
                            "--rankdyna_budget", "1.5"))


def test_invalid_initial_budget_names_both_flags(tmp_path, glue_dir):
    expected = r"^--rankdyna_initial_budget must be in \[--rankdyna_budget, 1\] = \[0.5, 1\], got 0.3"
    with pytest.raises(UsageError, match=expected):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--rankdyna", "--rankdyna_initial_budget", "0.3"))


def test_invalid_baseline_budget(tmp_path):
    with pytest.raises(UsageError, match=r"^--compression_budget must be in \(0, 1\], got 0.0"):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--compression_method", "svd", "--compression_budget",
                            "0"))


def test_invalid_rank_multiple_names_the_flag(tmp_path):
    expected = r"^--compression_rank_multiple must be an integer >= 1 .*got 0\."
    with pytest.raises(UsageError, match=expected):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--compression_method", "svd",
                            "--compression_rank_multiple", "0"))
    with pytest.raises(UsageError, match=r"^--rankdyna_rank_multiple must be an integer >= 1 .*got 0\."):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--rankdyna", "--rankdyna_rank_multiple", "0"))


@pytest.mark.parametrize("flag, value, message", [
    ("--rankdyna_distillation_weight", "1.5", r"^--rankdyna_distillation_weight must be a number in \[0, 1\].*1\.5"),
    ("--rankdyna_distillation_temperature", "0", r"^--rankdyna_distillation_temperature must be a finite number > 0"),
])
def test_invalid_distillation_values_name_the_flag(tmp_path, flag, value, message):
    with pytest.raises(UsageError, match=message):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--rankdyna", flag, value))


def test_distillation_flags_reach_the_rankdyna_config(tmp_path):
    _, _, rankdyna_args, _, _ = run_glue.parse_args(_argv(tmp_path, "--task_name", "rte", "--rankdyna",
                                                          "--rankdyna_distillation_weight", "0.5",
                                                          "--rankdyna_distillation_temperature", "3"))
    config = rankdyna_args.to_config()
    assert (config.distillation_weight, config.distillation_temperature) == (0.5, 3.0)


def test_rank_multiple_for_a_method_without_ranks(tmp_path):
    with pytest.raises(UsageError, match=r"^--compression_rank_multiple applies to rankdyna, svd, fwsvd, tfwsvd and "
                       r"ars, not to --compression_method lorap; drop it\."):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--compression_method", "lorap",
                            "--compression_rank_multiple", "8"))


def test_compression_rank_multiple_reaches_the_rankdyna_config(tmp_path):
    _, _, rankdyna_args, _, _ = run_glue.parse_args(_argv(tmp_path, "--task_name", "rte", "--compression_method",
                                                          "rankdyna", "--compression_rank_multiple", "8"))
    assert rankdyna_args.to_config().rank_multiple == 8


def test_rankdyna_flags_default_to_auto_and_take_numbers(tmp_path):
    from rankdyna_trainer import RankDynaConfig

    _, _, defaults, _, _ = run_glue.parse_args(_argv(tmp_path, "--task_name", "rte", "--rankdyna"))
    assert defaults.to_config().to_dict() == RankDynaConfig().to_dict()
    _, _, given, _, _ = run_glue.parse_args(_argv(
        tmp_path, "--task_name", "rte", "--rankdyna", "--rankdyna_warmup_fraction", "0.3",
        "--rankdyna_reallocation_interval", "4", "--rankdyna_init", "whitened", "--rankdyna_factor_scaling", "none",
        "--rankdyna_rank_by", "score", "--rankdyna_untrained_groups", "dropped"))
    config = given.to_config()
    assert (config.warmup_fraction, config.reallocation_interval) == (0.3, 4)
    assert isinstance(config.reallocation_interval, int)
    assert (config.init, config.factor_scaling, config.rank_by, config.untrained_groups) == (
        "whitened", "none", "score", "dropped")
    assert given.to_config({"rankdyna_warmup_fraction": 0.2}).warmup_fraction == 0.2  # a search trial's value


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope" / "train.tsv"
    with pytest.raises(UsageError, match="^--train_file/--validation_file: GLUE rte file not found: .*nope/train.tsv"):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--train_file", str(missing)))


def test_glue_dir_without_the_task_folder(tmp_path, glue_dir):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"^--glue_dir: No RTE/ folder for GLUE rte in .*'SST-2'"):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--glue_dir", str(tmp_path / "glue")))


def test_file_with_the_wrong_columns(tmp_path, glue_dir):
    sst2_as_rte = tmp_path / "train.tsv"
    shutil.copy(Path(glue_dir) / "SST-2" / "dev.tsv", sst2_as_rte)
    expected = r"lacks the columns \['sentence1', 'sentence2'\] that GLUE rte needs; it has \['sentence', 'label'\]"
    with pytest.raises(UsageError, match=expected):
        run_glue.main(_argv(tmp_path, "--task_name", "rte", "--train_file", str(sst2_as_rte)))


def test_rankdyna_without_training(tmp_path, glue_dir):
    with pytest.raises(UsageError, match="--rankdyna compresses while training: add --do_train"):
        run_glue.main(["--model_name_or_path", "minilm", "--task_name", "rte", "--rankdyna", "--do_eval",
                       "--output_dir", str(tmp_path)])


def test_without_a_glue_folder_the_hub_is_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)  # conftest sets HF offline, so the hub cannot answer
    with pytest.raises(UsageError, match=r"^--glue_dir \(not given.*nyu-mll/glue.*point --glue_dir \(or \$GLUE_DIR\)"):
        run_glue.main(_argv(tmp_path, "--task_name", "rte"))


def test_nothing_to_do(tmp_path, glue_dir):
    with pytest.raises(UsageError, match="Nothing to do"):
        run_glue.main(["--model_name_or_path", "minilm", "--task_name", "rte", "--output_dir", str(tmp_path)])


def test_model_folder_that_does_not_exist(tmp_path, glue_dir):
    with pytest.raises(UsageError, match="^--model_name_or_path: .*no-such-model"):
        run_glue.main(["--model_name_or_path", str(tmp_path / "no-such-model"), "--task_name", "rte", "--glue_dir",
                       glue_dir, "--do_eval", "--output_dir", str(tmp_path / "out")])


# -- the command line itself: one line, exit code 2, no traceback; real defaults in --help ------------------------
@pytest.mark.parametrize("argv, message", [
    (["--task_name", "rte", "--compression_method", "fw-svd", "--do_train"],
     "argument --compression_method/--compression-method: invalid choice: 'fw-svd'"),
    (["--task_name", "rte", "--rankdyna", "--rankdyna_budget", "1.5", "--do_train"],
     "--rankdyna_budget must be in (0, 1], got 1.5."),
    (["--task_name", "rte", "--rankdyna_singular_value_signal", "hessian"],
     "argument --rankdyna_singular_value_signal/--rankdyna-singular-value-signal: invalid choice: 'hessian'"),
    (["--task_name", "rte", "--rankdyna", "--rankdyna_warmup_fraction", "lots", "--do_train"],
     "--rankdyna_warmup_fraction takes a number or 'auto', got 'lots'."),
    (["--task_name", "rte", "--rankdyna", "--rankdyna_warmup_fraction", "1.5", "--do_train"],
     "--rankdyna_warmup_fraction must be in [0, 1) or 'auto', got 1.5."),
    (["--task_name", "rte", "--rankdyna", "--rankdyna_reallocation_interval", "2.5", "--do_train"],
     "--rankdyna_reallocation_interval takes an integer or 'auto', got '2.5'."),
    (["--task_name", "rte", "--rankdyna", "--rankdyna_init", "random", "--do_train"],
     "argument --rankdyna_init/--rankdyna-init: invalid choice: 'random' (choose from 'auto', 'svd', 'whitened')"),
])
def test_usage_errors_print_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code = run_glue.cli(["--model_name_or_path", "minilm", "--output_dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"run_glue.py: error: {message}")


def test_the_script_exits_2_without_a_traceback(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "run_glue.py"), "--model_name_or_path",
                             "minilm", "--task_name", "sst3", "--do_train", "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"run_glue.py: error: --task_name: Unknown GLUE task 'sst3'; choose one of "
                     f"{sorted(run_glue.GLUE_TASKS)}."]


def test_help_shows_the_real_defaults():
    parser = run_glue._OneLineErrorParser(run_glue.ARGUMENT_CLASSES)
    formatter = parser._get_formatter()
    help_of = {action.option_strings[0]: " ".join(formatter._expand_help(action).split())
               for action in parser._actions if action.option_strings and action.help}
    ours = [f.name for cls in (run_glue.ModelArguments, run_glue.RankDynaArguments) for f in dataclasses.fields(cls)]
    assert not [name for name in ours if "(default: None)" in help_of[f"--{name}"]]
    for flag, default in (("--rankdyna_budget", "0.5"), ("--rankdyna_reallocation_interval", "auto"),
                          ("--rankdyna_singular_value_signal", "gate"), ("--compression_method", "dense")):
        assert help_of[flag].endswith(f"(default: {default})"), help_of[flag]
    assert "every linear layer of the model's repeated blocks" in help_of["--rankdyna_target_modules"]
