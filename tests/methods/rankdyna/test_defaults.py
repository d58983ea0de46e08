"""RankDynaConfig's 'auto' defaults: resolved for the model's kind in prepare_model and for the run's length when
training starts, logged, recorded, and never over an explicit value."""

import logging

import pytest
import torch
from transformers import Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model
from rankdyna_trainer.budget import ParameterBudget
from rankdyna_trainer.methods.rankdyna.defaults import (
    AUTO,
    MODEL_KIND_FIELDS,
    kind_defaults,
    model_kind,
    needs_calibration,
    reallocation_interval_for,
)
from tests.tiny_models import ARCHITECTURES, torch_batches, training_dataset

ENCODER_RECIPE = {"init": "svd", "factor_scaling": "group", "rank_by": "score_per_param", "untrained_groups": "frozen",
                  "warmup_fraction": 0.3, "ffn_groups": "channels", "attention_groups": "channels"}
# scripts/benchmark_lm.py's recipe row before issue 28, at 0.8 (at 0.5 the start is truncated: 'dropped').
DECODER_RECIPE = {"init": "whitened", "factor_scaling": "none", "rank_by": "score", "untrained_groups": "frozen",
                  "warmup_fraction": 0.1, "ffn_groups": "channels", "attention_groups": "singular"}
LOGGER = "rankdyna_trainer.methods.rankdyna"


def _kind_fields(config) -> dict:
    return {name: getattr(config, name) for name in (*MODEL_KIND_FIELDS, "ffn_groups", "attention_groups")}


def _train(model, config, arch, max_steps, out, callback_config=None):
    callback = RankDynaCallback(callback_config or config)
    args = TrainingArguments(str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1000)
    Trainer(model=model, args=args, train_dataset=training_dataset(arch.task, n=16), callbacks=[callback]).train()
    return callback


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_model_kind_is_decoder_for_causal_lms_only(name):
    arch = ARCHITECTURES[name]
    assert model_kind(arch.build()) == ("decoder" if arch.task == "causal_lm" else "encoder")


def test_an_encoder_gets_the_glue_recipe_and_the_config_is_left_as_given(caplog):
    config = RankDynaConfig(target_budget=0.5)
    model = ARCHITECTURES["bert"].build()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        prepare_model(model, config)
    assert _kind_fields(model.rankdyna_config) == ENCODER_RECIPE
    assert all(getattr(config, name) == AUTO for name in (*MODEL_KIND_FIELDS, "reallocation_interval"))
    lines = [r.getMessage() for r in caplog.records if "RankDyna defaults for" in r.getMessage()]
    assert lines == ["RankDyna defaults for an encoder (BertForSequenceClassification): init=svd, "
                     "factor_scaling=group, rank_by=score_per_param, untrained_groups=frozen, warmup_fraction=0.3, "
                     "ffn_groups=channels (2 FFNs pruned by intermediate channels), attention_groups=channels (2 "
                     "attentions pruned by per-head q/k and v/o channels); reallocation_interval is set from the run's "
                     "length when training starts (docs/method.md#defaults)."]
    assert not needs_calibration(config, model)


@pytest.mark.parametrize("budget,start", [(0.8, "frozen"), (0.5, "dropped")])
def test_a_decoder_gets_the_lm_benchmarks_recipe(budget, start, caplog):
    """The default prepares exactly the model the explicit recipe prepares (same factors, same config)."""
    arch = ARCHITECTURES["llama"]
    calibration = torch_batches(arch.task)
    default = arch.build()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        prepare_model(default, RankDynaConfig(target_budget=budget), calibration)
    recipe = {**DECODER_RECIPE, "untrained_groups": start}
    explicit = arch.build()
    prepare_model(explicit, RankDynaConfig(target_budget=budget, **recipe), calibration)
    assert _kind_fields(default.rankdyna_config) == recipe
    assert default.rankdyna_config.to_dict() == explicit.rankdyna_config.to_dict()
    default_state, explicit_state = default.state_dict(), explicit.state_dict()
    assert default_state.keys() == explicit_state.keys()
    assert all(torch.equal(default_state[k], explicit_state[k]) for k in default_state)
    sign = ">" if start == "frozen" else "<="
    assert f"untrained_groups={start} (target_budget {budget} {sign} 0.5)" in caplog.text
    assert "RankDyna defaults for a decoder (LlamaForCausalLM): init=whitened, factor_scaling=none" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_decoder_without_calibration_batches_starts_from_svd_with_a_warning(caplog):
    arch = ARCHITECTURES["llama"]
    config = RankDynaConfig(target_budget=0.8)
    assert needs_calibration(config, arch.build())
    model = arch.build()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        prepare_model(model, config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "needs calibration data" in warnings[0]
    assert "prepare_model(model, config, calibration_batches=" in warnings[0]
    assert "init='svd'" in warnings[0]
    assert _kind_fields(model.rankdyna_config) == {**DECODER_RECIPE, "init": "svd"}
    plain = arch.build()
    prepare_model(plain, RankDynaConfig(target_budget=0.8, **{**DECODER_RECIPE, "init": "svd"}))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_explicit_values_win(name, caplog, tmp_path):
    arch = ARCHITECTURES[name]
    given = {"init": "svd", "factor_scaling": "matrix", "rank_by": "score", "untrained_groups": "dropped",
             "warmup_fraction": 0.2, "ffn_groups": "singular", "attention_groups": "singular",
             "reallocation_interval": 3}
    config = RankDynaConfig(target_budget=0.8, **given)
    model = arch.build()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        prepare_model(model, config)  # no calibration batches: init is explicit, so no warning either
    assert model.rankdyna_config.to_dict() == config.to_dict()
    callback = _train(model, config, arch, 20, tmp_path)
    assert "RankDyna defaults for" not in caplog.text and "calibration" not in caplog.text
    assert callback.budget.interval == 3 and callback.config.to_dict() == config.to_dict()


def test_the_callback_takes_prepare_models_resolution_and_its_own_explicit_values(tmp_path):
    arch = ARCHITECTURES["llama"]
    model = arch.build()
    prepare_model(model, RankDynaConfig(target_budget=0.8))  # init falls back to svd (warned)
    callback = _train(model, None, arch, 20, tmp_path,
                      callback_config=RankDynaConfig(target_budget=0.8, warmup_fraction=0.25))
    assert callback.config.warmup_fraction == 0.25 and callback.budget.warmup_steps == 5
    assert callback.config.init == "svd" and callback.config.rank_by == "score"  # from prepare_model
    assert model.rankdyna_config.to_dict() == callback.config.to_dict()


@pytest.mark.parametrize("name,max_steps,interval", [("llama", 30, 2), ("bert", 60, 3)])
def test_the_reallocation_interval_follows_the_runs_length(name, max_steps, interval, caplog, tmp_path):
    arch = ARCHITECTURES[name]
    model = arch.build()
    calibration = torch_batches(arch.task) if name == "llama" else None
    config = RankDynaConfig(target_budget=0.5)
    prepare_model(model, config, calibration)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        callback = _train(model, config, arch, max_steps, tmp_path)
    budget = callback.budget
    pruning = budget.final_start - budget.warmup_steps
    assert budget.interval == interval == reallocation_interval_for(pruning)
    assert callback.config.reallocation_interval == interval == model.rankdyna_config.reallocation_interval
    assert (f"RankDyna defaults for a run of {max_steps} optimizer steps: reallocation_interval={interval} "
            f"({pruning} pruning steps // 10, within [1, 10]") in caplog.text
    assert config.reallocation_interval == AUTO  # the user's config is left as given


def test_the_interval_rule():
    assert [reallocation_interval_for(n) for n in (0, 9, 10, 21, 99, 100, 5000)] == [1, 1, 1, 2, 9, 10, 10]
    # The SmolLM2 benchmark: 30 steps, the decoder's warm-up 0.1 and final 0.2 leave 21 pruning steps.
    lm = ParameterBudget.from_fractions(1000, 1.0, 0.8, 30, kind_defaults("decoder", 0.8)["warmup_fraction"], 0.2)
    assert reallocation_interval_for(lm.final_start - lm.warmup_steps) == 2


def test_a_resolved_config_saves_loads_and_never_resolves_again(tmp_path):
    arch = ARCHITECTURES["llama"]
    model = arch.build()
    prepare_model(model, RankDynaConfig(target_budget=0.5), torch_batches(arch.task))
    resolved = _train(model, None, arch, 30, tmp_path / "run").config
    assert AUTO not in resolved.to_dict().values()
    resolved.save_pretrained(str(tmp_path))
    loaded = RankDynaConfig.from_pretrained(str(tmp_path))
    assert loaded.to_dict() == resolved.to_dict()
    encoder = ARCHITECTURES["bert"].build()  # another kind: the decoder's values are explicit now
    prepare_model(encoder, loaded, torch_batches("classification"))
    assert encoder.rankdyna_config.to_dict() == loaded.to_dict()


@pytest.mark.parametrize("kwargs,message", [
    ({"init": "random"}, "init must be one of ('auto', 'svd', 'whitened'), got 'random'"),
    ({"factor_scaling": "x"}, "factor_scaling must be one of ('auto', 'none', 'matrix', 'group'), got 'x'"),
    ({"rank_by": "x"}, "rank_by must be one of ('auto', 'score', 'score_per_param'), got 'x'"),
    ({"untrained_groups": "x"}, "untrained_groups must be one of ('auto', 'frozen', 'dropped'), got 'x'"),
    ({"warmup_fraction": "0.3"}, "warmup_fraction must be in [0, 1) or 'auto', got '0.3'"),
    ({"reallocation_interval": 0}, "reallocation_interval must be an integer >= 1 or 'auto', got 0"),
    ({"reallocation_interval": "10"}, "reallocation_interval must be an integer >= 1 or 'auto', got '10'"),
])
def test_bad_values_name_the_allowed_set_with_auto(kwargs, message):
    with pytest.raises(ValueError) as raised:
        RankDynaConfig(**kwargs)
    assert message in str(raised.value)


def test_a_default_that_does_not_fit_an_explicit_value_says_so():
    model = ARCHITECTURES["bert"].build()
    with pytest.raises(ValueError) as raised:
        prepare_model(model, RankDynaConfig(final_fraction=0.75))  # the encoder's warm-up 0.3 leaves no steps
    message = str(raised.value)
    assert "RankDyna defaults for an encoder (" in message and "warmup_fraction='auto' -> 0.3" in message
    assert "must be below 1" in message and "Set these fields explicitly" in message
    prepare_model(ARCHITECTURES["llama"].build(), RankDynaConfig(final_fraction=0.75))  # 0.1 fits a decoder


def test_a_decoder_with_a_factor_budget_below_the_target_keeps_the_exact_start(caplog):
    """The truncated start could not reach the target with fewer trainable groups than it keeps: 'frozen'."""
    model = ARCHITECTURES["llama"].build()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        prepare_model(model, RankDynaConfig(target_budget=0.5, factor_budget=0.25, init="svd"))
    assert model.rankdyna_config.untrained_groups == "frozen"
    assert "untrained_groups=frozen (factor_budget 0.25 < target_budget 0.5)" in caplog.text
