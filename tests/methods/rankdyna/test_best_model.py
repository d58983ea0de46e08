"""`load_best_model_at_end=True` with the real Trainer: the model it ends with is at the target budget."""

import json
import logging

import pytest
from transformers import Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.methods.rankdyna import gated_layers
from rankdyna_trainer.methods.rankdyna.model import kept_params
from tests.conftest import random_classification_dataset, tiny_bert
from tests.round_trip import single_thread

# 24 optimizer steps; the last allocation (at the target) is made on the step that starts at global step 18, so
# checkpoints 4..16 are denser than the target and 20, 24 are at it.
STEPS, TARGET = 24, 0.4


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _best_model_trainer(tmp_path, metric, greater_is_better, **overrides):
    config = RankDynaConfig(target_budget=TARGET, reallocation_interval=2, final_fraction=0.25)
    model = prepare_model(tiny_bert(), config)
    layers = list(gated_layers(model).values())

    def compute_metrics(_):
        # "kept" is a metric that is best for the densest model: without the guard, the first checkpoint would win.
        return {"kept": kept_params(layers)}

    args = dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=8,
                eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4, load_best_model_at_end=True,
                metric_for_best_model=metric, greater_is_better=greater_is_better, report_to=[], use_cpu=True,
                disable_tqdm=True, seed=0)
    args.update(overrides)
    data = random_classification_dataset(64)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=data,
                      eval_dataset=data.select(range(16)), compute_metrics=compute_metrics,
                      callbacks=[RankDynaCallback(config)])
    return trainer, model, layers


def _target_params(layers):
    return int(TARGET * sum(l.full_cost for l in layers))


def test_best_model_from_before_the_target_is_never_reloaded(tmp_path, caplog):
    trainer, model, layers = _best_model_trainer(tmp_path, "kept", greater_is_better=True)
    with caplog.at_level(logging.WARNING, logger="rankdyna_trainer"):
        trainer.train()

    evaluated = {h["step"]: h["eval_kept"] for h in trainer.state.log_history if "eval_kept" in h}
    assert evaluated[4] > _target_params(layers), "the earliest checkpoint should be denser than the target"
    # The best is the best of the checkpoints at the target (20 and 24 hold the same final allocation).
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-20")
    assert trainer.state.best_metric == evaluated[20] <= _target_params(layers)
    assert kept_params(layers) <= _target_params(layers)
    assert "above the target" not in caplog.text

    saved = json.loads((tmp_path / "out" / "checkpoint-8" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] is None and saved["best_global_step"] is None  # a resume agrees

    dense_total = sum(p.numel() for p in tiny_bert().parameters())
    export_model(model)
    assert sum(p.numel() for p in model.parameters()) < dense_total


def test_best_among_checkpoints_at_the_target_follows_the_metric(tmp_path):
    trainer, _, layers = _best_model_trainer(tmp_path, "loss", greater_is_better=False, max_steps=32)
    trainer.train()
    final_start = trainer.callback_handler.callbacks[0].budget.final_start
    at_target = {h["step"]: h["eval_loss"] for h in trainer.state.log_history
                 if "eval_loss" in h and h["step"] > final_start}
    assert len(at_target) >= 2
    best_step = min(at_target, key=at_target.get)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert trainer.state.best_metric == at_target[best_step]
    assert kept_params(layers) <= _target_params(layers)


def test_train_end_warns_when_the_model_is_over_the_target(tmp_path, caplog):
    trainer, _, layers = _best_model_trainer(tmp_path, "kept", greater_is_better=True, max_steps=12, eval_steps=12,
                                             save_steps=12)
    trainer.train()
    for layer in layers:  # what reloading a dense checkpoint by hand would do
        layer.gate.fill_(1)
    with caplog.at_level(logging.WARNING, logger="rankdyna_trainer"):
        trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    assert "above the target budget" in caplog.text
    assert "export_model would save a model larger than the target" in caplog.text


def test_resumed_state_naming_a_checkpoint_before_the_target_is_not_kept(tmp_path):
    trainer, _, _ = _best_model_trainer(tmp_path, "kept", greater_is_better=True)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-8"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())  # as an older version (or another callback) would have left it
    state.update(best_global_step=8, best_model_checkpoint=str(checkpoint), best_metric=1e12)
    state_file.write_text(json.dumps(state))

    resumed, _, layers = _best_model_trainer(tmp_path, "kept", greater_is_better=True)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.best_model_checkpoint.endswith("checkpoint-20")
    assert kept_params(layers) <= _target_params(layers)
