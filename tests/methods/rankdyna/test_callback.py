import json
import os

import pytest
from transformers import Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model, rank_pattern
from rankdyna_trainer.budget import matrix_cost
from rankdyna_trainer.methods.rankdyna import svd_layers
from tests.conftest import random_classification_dataset, tiny_bert


def _trainer(model, tmp_path, config, **overrides):
    args = dict(output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=8,
                logging_steps=4, save_steps=8, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=random_classification_dataset(96),
                   callbacks=[RankDynaCallback(config)])


def test_training_ends_on_the_budget_and_reports_it(tmp_path):
    config = RankDynaConfig(target_budget=0.35, reallocation_interval=2, final_fraction=0.25, ffn_groups="singular",
                            attention_groups="singular")
    model = prepare_model(tiny_bert(), config)
    trainer = _trainer(model, tmp_path, config)
    trainer.train()

    layers = svd_layers(model).values()
    dense = sum(l.out_features * l.in_features for l in layers)
    ranks = rank_pattern(model)
    spent = sum(matrix_cost(ranks[n], l.out_features, l.in_features) for n, l in svd_layers(model).items())
    assert 0.34 * dense <= spent <= 0.35 * dense
    assert len(set(ranks.values())) > 1, "ranks should differ across matrices"

    logged = [h for h in trainer.state.log_history if "rankdyna/params" in h]
    assert len(logged) >= 3
    fractions = [h["rankdyna/params_fraction"] for h in logged]
    assert fractions[0] > fractions[-1]
    assert logged[-1]["rankdyna/budget_params"] == int(0.35 * dense)
    assert trainer.callback_handler.callbacks[0].__class__ is RankDynaCallback  # runs before reporters

    out = tmp_path / "out"
    final = json.loads((out / "rank_pattern.json").read_text())
    assert final["ranks"] == ranks and final["params"] == spent
    checkpoints = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert checkpoints and all((out / c / "rank_pattern.json").is_file() for c in checkpoints)


def test_callback_without_prepared_model_fails_before_training(tmp_path):
    trainer = _trainer(tiny_bert(), tmp_path, RankDynaConfig())
    with pytest.raises(ValueError, match="call `rankdyna_trainer.prepare_model"):
        trainer.train()


def test_schedule_without_room_to_prune_fails_before_training(tmp_path):
    config = RankDynaConfig(warmup_fraction=0.5, final_fraction=0.45)
    trainer = _trainer(prepare_model(tiny_bert(), config), tmp_path, config, max_steps=3)
    with pytest.raises(ValueError, match="no step to prune"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_config_may_come_from_the_prepared_model(tmp_path):
    config = RankDynaConfig(target_budget=0.6, reallocation_interval=3)
    model = prepare_model(tiny_bert(), config)
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=10, report_to=[], use_cpu=True,
                                                          per_device_train_batch_size=8, disable_tqdm=True),
                      train_dataset=random_classification_dataset(32), callbacks=[RankDynaCallback()])
    trainer.train()
    dense = sum(l.out_features * l.in_features for l in svd_layers(model).values())
    spent = sum(matrix_cost(r, l.out_features, l.in_features)
                for r, l in zip(rank_pattern(model).values(), svd_layers(model).values()))
    assert spent <= 0.6 * dense
