"""scripts/bench_cost.py: one-line errors for bad flags, and the ratios and page from run files."""

import json

import pytest
import torch

from .test_glue_table import _load_script

PHASES = ("start", "middle", "end")


@pytest.mark.parametrize("argv, named", [(["--budgets", "1.5"], "--budgets"), (["--lm_steps", "3"], "--lm_steps"),
                                         (["--glue_dir", "/no/such/folder"], "--glue_dir")])
def test_bad_flags_are_one_line_naming_the_flag(argv, named, capsys):
    bench = _load_script("bench_cost")
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in error and "Traceback" not in error


@pytest.mark.parametrize("argv, named", [
    (["--rankdyna_attention_groups", "channels", "--results_dir", "r", "--json", "j", "--out", "o"], "--models minilm"),
    (["--rankdyna_attention_groups", "singular", "--models", "minilm", "--results_dir", "r"], "--json, --out"),
])
def test_attention_groups_other_than_the_default_need_their_own_outputs(argv, named, capsys):
    bench = _load_script("bench_cost")
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(argv + ["--report_only"])
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


def test_attention_groups_reach_run_glue(tmp_path, monkeypatch):
    bench = _load_script("bench_cost")
    import run_glue

    class Called(Exception):
        pass

    def fake_main(argv, extra_callbacks):
        raise Called(argv)

    monkeypatch.setattr(run_glue, "main", fake_main)
    args = bench.parse_args(["--models", "minilm", "--rankdyna_attention_groups", "singular", "--report_only",
                             "--results_dir", str(tmp_path), "--json", "j", "--out", "o"])
    seen = []
    for budget in (0.2, None):
        with pytest.raises(Called) as called:
            bench.measure_minilm(args, budget, memory=True)
        seen.append(called.value.args[0])
    assert seen[0][seen[0].index("--rankdyna_attention_groups") + 1] == "singular"
    assert "--rankdyna_attention_groups" not in seen[1]  # dense


def test_smollm2_run_starts_from_the_decoder_defaults_whitened_svd(tmp_path, caplog):
    # Without calibration text the decoder default falls back to the plain SVD: the benchmark must pass some, or its
    # RankDyna rows measure a start no user of the defaults gets.
    bench = _load_script("bench_cost")
    args = bench.parse_args(["--models", "smollm2", "--report_only", "--results_dir", str(tmp_path),
                             "--lm_memory_steps", "10"])  # the fewest steps the schedule can prune in
    with caplog.at_level("WARNING"):
        record = bench.measure_smollm2(args, 0.5, memory=True)
    assert record["init"] == "whitened"
    assert not [r for r in caplog.records if "calibration_batches" in r.getMessage()]
    assert 0.45 < record["kept_fraction"] < 1.0


def _run(model, budget, wall, peak, kind="time", **extra):
    steps = {"start": wall / 100, "middle": wall / 200, "end": wall / 300}
    return {"model": model, "budget": budget, "kind": kind, "wall_seconds": wall, "train_seconds": wall - 5,
            "peak_bytes": peak * 2**20, "step_seconds": steps, **extra}


def test_ratios_and_page_are_rebuilt_from_the_run_files(tmp_path):
    bench = _load_script("bench_cost")
    runs = tmp_path / "runs"
    runs.mkdir()
    parts = {"forward_backward": {"start": 0.5, "middle": 0.4, "end": 0.3}, "optimizer": {p: 0.07 for p in PHASES},
             "after": {p: 0.001 for p in PHASES}}
    hook = {"start": 0.002, "middle": 0.05, "end": 0.0}
    for run in [_run("minilm", None, 600.0, 9, metric=0.87),
                _run("minilm", 0.5, 420.0, 9, metric=0.86, step_part_seconds=parts, rankdyna_hook_seconds=hook),
                _run("minilm", 0.2, 300.0, 9, metric=0.84), _run("smollm2", None, 100.0, 9, train_loss=3.0),
                _run("smollm2", 0.5, 90.0, 9, train_loss=3.2), _run("minilm", None, 60.0, 1000, "memory", metric=0.8),
                _run("minilm", 0.5, 50.0, 1050, "memory", metric=0.8),
                _run("minilm", 0.2, 50.0, 1040, "memory", metric=0.8),
                _run("smollm2", None, 10.0, 4000, "memory", train_loss=3.0),
                _run("smollm2", 0.5, 9.0, 3800, "memory", train_loss=3.0),
                _run("smollm2", None, 80.0, 9, "repeat", train_loss=3.0)]:
        name = bench.run_name(run["model"], run["budget"], run["kind"])
        (runs / f"{name}.json").write_text(json.dumps(run))
    page = tmp_path / "cost.md"
    page.write_text("# Cost\n<!-- bench_cost:begin -->\nold\n<!-- bench_cost:end -->\nafter\n"
                    "<!-- bench_cost_parts:begin -->\nold parts\n<!-- bench_cost_parts:end -->\n")
    bench.main(["--report_only", "--results_dir", str(runs), "--json", str(tmp_path / "cost.json"),
                "--out", str(page)])
    cost = json.loads((tmp_path / "cost.json").read_text())
    # SmolLM2's dense run was timed again after its RankDyna runs: the ratio is over the mean of the two (90 s).
    assert cost["run_ratio"] == {"0.5": 0.7, "0.2": 0.5} and cost["lm_run_ratio"] == {"0.5": 1.0}
    assert cost["peak_memory_ratio"] == {"minilm": 1.05, "smollm2": 0.95}
    text = page.read_text()
    assert "old" not in text and "after\n<!-- bench_cost_parts:begin -->" in text
    # RankDyna's hook is shown apart from the forward/backward part it ran inside; runs without parts have no row.
    assert "| minilm | RankDyna 0.5 | 498 / 350 / 300 | 2 / 50 / 0 | 70 / 70 / 70 | 1 / 1 / 1 |" in text
    assert "| minilm | dense | 6" not in text.split("bench_cost_parts:begin")[1]
    assert "| minilm | RankDyna 0.2 | 300 | 0.50 |" in text and "| smollm2 | RankDyna 0.5 | 90 | 1.00 |" in text
    assert "| smollm2 | dense | 100 | 1.11 |" in text and "| smollm2 | dense, again after | 80 | 0.89 |" in text
    assert "| 1040 | 1.04 | 84.0 |" in text  # peak memory from the memory run, quality from the timed one
    bench.main(["--report_only", "--results_dir", str(runs), "--json", str(tmp_path / "new.json"),
                "--out", str(tmp_path / "new.md")])  # a new page: the table alone
    assert "| minilm | RankDyna 0.2 | 300 | 0.50 |" in (tmp_path / "new.md").read_text()


@pytest.mark.parametrize("argv, named", [(["--kept", "0.5"], "--kept"), (["--kept", "2,1"], "--kept"),
                                         (["--steps", "2"], "--steps"),
                                         (["--attention_groups", "heads"], "--attention_groups"),
                                         (["--kept", "1,1", "1,0.5", "--schedule_bound", "0.2"], "--schedule_bound"),
                                         (["--kept", "1,0.2", "--schedule_bound", "0.2"], "--schedule_bound"),
                                         (["--warmup_fraction", "1"], "--warmup_fraction")])
def test_step_profile_bad_flags_are_one_line(argv, named, capsys):
    profile = _load_script("bench_step_profile")
    with pytest.raises(SystemExit) as stopped:
        profile.main(argv)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


def test_step_profile_ranks_from_needs_a_file_with_ranks(tmp_path, capsys):
    profile = _load_script("bench_step_profile")
    (tmp_path / "run.json").write_text(json.dumps({"score": 80.0}))
    for path in (tmp_path / "run.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as stopped:
            profile.main(["--ranks_from", str(path)])
        assert stopped.value.code == 2
        assert "--ranks_from" in capsys.readouterr().err.strip().splitlines()[-1]


def test_step_profile_sets_a_run_allocation_layer_by_layer():
    from rankdyna_trainer.methods.rankdyna import gated_layers, rank_pattern

    profile = _load_script("bench_step_profile")
    model, _ = profile.build((1.0, 0.5))
    ranks = rank_pattern(model)
    first, last = list(ranks)[0], list(ranks)[-1]
    ranks[first], ranks[last] = 3, gated_layers(model)[last].gate.numel()  # uneven, as a global allocation is
    rebuilt, _ = profile.build(ranks)
    assert rank_pattern(rebuilt) == ranks
    with pytest.raises(ValueError, match="missing: .*" + first.replace(".", r"\.")):
        profile.build({name: rank for name, rank in ranks.items() if name != first})


def test_step_profile_times_the_optimizer_a_trainer_builds(tmp_path):
    from transformers import Trainer, TrainingArguments

    profile = _load_script("bench_step_profile")
    model, optimizer = profile.build(None)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-5, report_to=[])
    built = Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is type(built)
    for key in ("lr", "betas", "eps", "fused", "foreach"):
        assert optimizer.defaults.get(key) == built.defaults.get(key), key


def test_step_profile_scores_the_gates_only_when_asked():
    from rankdyna_trainer.methods.rankdyna import gated_layers

    profile = _load_script("bench_step_profile")
    ids = torch.randint(1000, 20000, (2, 8), generator=torch.Generator().manual_seed(0))
    for scoring, scored in (("on", True), ("off", False)):
        model, _ = profile.build((1.0, 0.5), scoring=scoring)
        layers = list(gated_layers(model).values())
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        assert all(l.gate_scored == scored for l in layers)
        assert any(l.gate_grad.any() for l in layers) == scored


def test_schedule_bound_follows_the_warmup():
    profile = _load_script("bench_step_profile")
    cost = {0.2: 0.5, 0.5: 0.7, 1.0: 1.0}
    bound = {w: float(profile.schedule_bounds(cost, [0.2], 500, w).splitlines()[1].split(":")[1].split()[0])
             for w in (0.0, 0.3)}
    assert bound[0.0] < bound[0.3] <= 1.0


@pytest.mark.parametrize("argv, named", [(["--weights", "0", "1.5"], "--weights"), (["--steps", "4"], "--steps"),
                                         (["--repeats", "0"], "--repeats")])
def test_distillation_bench_bad_flags_are_one_line(argv, named, capsys):
    bench = _load_script("bench_distillation")
    with pytest.raises(SystemExit) as stopped:
        bench.main(argv)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]
