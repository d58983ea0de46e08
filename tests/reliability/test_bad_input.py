"""Every configuration error a user can hit, with its message; docs/reliability.md lists the same table."""

import os
import re
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from rankdyna_trainer.budget import ParameterBudget
from rankdyna_trainer.methods.rankdyna import RankDynaCallback, RankDynaConfig, prepare_model
from rankdyna_trainer.methods.rankdyna.sharded_checkpoint import load_resume_state
from rankdyna_trainer.targets import find_target_linears
from tests.conftest import tiny_bert

from .helpers import build_trainer, small_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def _callback_begin(model, args=None, config=None):
    args = args or TrainingArguments("unused", use_cpu=True, report_to=[])
    RankDynaCallback(config).on_train_begin(args, TrainerState(max_steps=20), TrainerControl(), model=model)


def _prepared_without_config():
    model = prepare_model(tiny_bert(), RankDynaConfig())
    del model.rankdyna_config
    return model


def _with_fsdp():
    return TrainingArguments("unused", use_cpu=True, report_to=[], fsdp=True)


def _with_fsdp1():
    return TrainingArguments("unused", use_cpu=True, report_to=[], fsdp=True, fsdp_config={"fsdp_version": 1})


def _with_deepspeed():
    # Building TrainingArguments(deepspeed=...) needs the deepspeed package; the callback reads the field only.
    args = TrainingArguments("unused", use_cpu=True, report_to=[])
    args.deepspeed = {"zero_optimization": {"stage": 3}}
    return args


def _launched_with_fsdp():
    # What `accelerate launch` with an FSDP config sets, with nothing about FSDP in TrainingArguments.
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    try:
        _callback_begin(prepare_model(tiny_bert(), RankDynaConfig()))
    finally:
        del os.environ["ACCELERATE_USE_FSDP"]


def _multi_label_bert():
    model = tiny_bert(num_labels=3)
    model.config.problem_type = "multi_label_classification"
    return model


class _OtherModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


# case id -> (what the user does, the message it raises). The ids are the first column of the docs table.
CASES = {
    "target_budget": lambda: RankDynaConfig(target_budget=0.0),
    "initial_budget": lambda: RankDynaConfig(target_budget=0.5, initial_budget=0.3),
    "warmup_fraction": lambda: RankDynaConfig(warmup_fraction=1.0),
    "final_fraction": lambda: RankDynaConfig(final_fraction=-0.1),
    "warmup_plus_final": lambda: RankDynaConfig(warmup_fraction=0.6, final_fraction=0.4),
    "reallocation_interval": lambda: RankDynaConfig(reallocation_interval=0),
    "beta1": lambda: RankDynaConfig(beta1=1.0),
    "beta2": lambda: RankDynaConfig(beta2=-0.5),
    "init_rank": lambda: RankDynaConfig(init_rank=0),
    "factor_budget": lambda: RankDynaConfig(factor_budget=-0.25),
    "factor_budget_dropped": lambda: RankDynaConfig(target_budget=0.5, factor_budget=0.25, untrained_groups="dropped"),
    "init": lambda: RankDynaConfig(init="random"),
    "whitening_damping": lambda: RankDynaConfig(whitening_damping=-1.0),
    "whitened_without_calibration": lambda: prepare_model(tiny_bert(), RankDynaConfig(init="whitened")),
    "orth_reg_weight": lambda: RankDynaConfig(orth_reg_weight=-1.0),
    "rank_multiple": lambda: RankDynaConfig(rank_multiple=0),
    "singular_value_signal": lambda: RankDynaConfig(singular_value_signal="hessian"),
    "target_modules_empty": lambda: RankDynaConfig(target_modules=[]),
    "target_modules_match_nothing": lambda: prepare_model(tiny_bert(), RankDynaConfig(target_modules=["qkv"])),
    "regex_match_nothing": lambda: find_target_linears(tiny_bert(), r".*\.nope"),
    "no_default_targets": lambda: prepare_model(_OtherModel(), RankDynaConfig()),
    "prepare_twice": lambda: prepare_model(prepare_model(tiny_bert(), RankDynaConfig()), RankDynaConfig()),
    "no_svd_layers": lambda: _callback_begin(tiny_bert()),
    "no_config": lambda: _callback_begin(_prepared_without_config()),
    "fsdp": lambda: _callback_begin(prepare_model(tiny_bert(), RankDynaConfig()), args=_with_fsdp()),
    "fsdp_from_accelerate_launch": _launched_with_fsdp,
    "fsdp1": lambda: _callback_begin(prepare_model(tiny_bert(), RankDynaConfig()), args=_with_fsdp1()),
    "deepspeed": lambda: _callback_begin(prepare_model(tiny_bert(), RankDynaConfig()), args=_with_deepspeed()),
    "sharded_checkpoint": lambda: RankDynaCallback(RankDynaConfig(), sharded_checkpoint="dcp"),
    "sharded_resume_without_state": lambda: load_resume_state("out/checkpoint-5", None, None, None, step=5),
    "distillation_weight": lambda: RankDynaConfig(distillation_weight=1.5),
    "distillation_temperature": lambda: RankDynaConfig(distillation_temperature=0),
    "distillation_label_smoothing": lambda: _callback_begin(
        prepare_model(tiny_bert(), RankDynaConfig(distillation_weight=0.5)),
        args=TrainingArguments("unused", use_cpu=True, report_to=[], label_smoothing_factor=0.1)),
    "distillation_multi_label": lambda: _callback_begin(
        prepare_model(_multi_label_bert(), RankDynaConfig(distillation_weight=0.5))),
    "unknown_steps": lambda: ParameterBudget.from_fractions(1000, 1.0, 0.5, None, 0.1, 0.2),
    "no_step_to_prune": lambda: build_trainer(
        "unused", config=small_config(warmup_fraction=0.5, final_fraction=0.4), max_steps=2).train(),
}


def _docs_table() -> dict[str, str]:
    """case id -> message, from the configuration-error table of docs/reliability.md."""
    text = DOCS.read_text()
    section = text.split("<!-- config-errors:start -->")[1].split("<!-- config-errors:end -->")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "`case`":
            rows[cells[0].strip("`")] = cells[2].replace("\\|", "|")
    return rows


def _raised(case: str) -> str:
    with pytest.raises(ValueError) as info:
        CASES[case]()
    return str(info.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_raised_with_the_documented_message(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainer-based case writes nothing, but keep it out of the repo anyway
    documented = _docs_table()
    assert case in documented, f"{case} missing from the table in {DOCS.name}"
    assert " ".join(_raised(case).split()) == " ".join(documented[case].split())


def test_docs_table_lists_only_tested_cases():
    assert set(_docs_table()) == set(CASES)


def test_messages_name_the_bad_value():
    # Spot checks that the value the user passed appears in the message (the docs table shows the rest).
    assert "0.0" in _raised("target_budget") and "0.3" in _raised("initial_budget")
    assert "'qkv'" in _raised("target_modules_match_nothing")
    assert re.search(r"No repeated blocks found in _OtherModel", _raised("no_default_targets"))
