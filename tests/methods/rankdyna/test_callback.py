import json
import os

import pytest
import torch
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


def test_scores_start_where_the_first_reallocation_still_sees_them(tmp_path, monkeypatch):
    """Gate gradients are computed only on the steps whose scores are read: from memory_steps before pruning starts
    (beta 0.5: 25 steps) to the last allocation. The run ends exactly as one that scores from step 0."""
    from rankdyna_trainer.methods.rankdyna import callback as callback_module
    from rankdyna_trainer.methods.rankdyna import gated_layers
    from rankdyna_trainer.methods.rankdyna.importance import memory_steps

    assert memory_steps(0.5, 0.5) == 25 and memory_steps(0.85, 0.85) == 103 and memory_steps(0.0, 0.0) == 0

    def run(folder):
        config = RankDynaConfig(target_budget=0.4, beta1=0.5, beta2=0.5, warmup_fraction=0.5, final_fraction=0.2,
                                reallocation_interval=4)
        model = prepare_model(tiny_bert(), config)
        scored = {}

        class Probe(RankDynaCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                super().on_step_begin(args, state, control, **kwargs)
                scored[state.global_step] = {l.gate_scored for l in self._layers}

        args = TrainingArguments(str(folder), max_steps=80, per_device_train_batch_size=8, learning_rate=1e-3,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0)
        Trainer(model=model, args=args, train_dataset=random_classification_dataset(),
                callbacks=[Probe(config)]).train()
        return model, scored

    model, scored = run(tmp_path / "a")
    assert all(flags == {step in range(40 - 25, 64 + 1)} for step, flags in scored.items()), scored
    assert all(l.gate_scored for l in gated_layers(model).values())  # back to the default after training
    monkeypatch.setattr(callback_module, "memory_steps", lambda beta1, beta2: 10 ** 6)  # scores from step 0
    from_zero, scored = run(tmp_path / "b")
    assert all(flags == {step <= 64} for step, flags in scored.items())
    layers, layers_from_zero = gated_layers(model), gated_layers(from_zero)
    for name, layer in layers.items():
        assert torch.equal(layer.gate, layers_from_zero[name].gate), name
        torch.testing.assert_close(layer.gate_fisher, layers_from_zero[name].gate_fisher, rtol=1e-5, atol=0)
