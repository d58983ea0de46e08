"""Small real-Trainer runs shared by the reliability tests (tiny random BERT, random token data)."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from rankdyna_trainer.methods.rankdyna import RankDynaCallback, RankDynaConfig, prepare_model, svd_layers
from tests.conftest import random_classification_dataset, tiny_bert


def small_config(**overrides) -> RankDynaConfig:
    """A schedule that prunes within a 20-step run: 2 warm-up steps, reallocation every 2 steps, 4 final steps."""
    # The element-wise 'sensitivity' statistics are the most state a fault can corrupt, so these tests use them;
    # tests/methods/rankdyna/test_importance.py covers the default 'fisher' score.
    settings = dict(target_budget=0.3, warmup_fraction=0.1, final_fraction=0.2, reallocation_interval=2,
                    importance="sensitivity")
    settings.update(overrides)
    return RankDynaConfig(**settings)


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3,
        seed=0, data_seed=0, report_to=[], save_strategy="no", logging_steps=5, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def tiny_bert_without_dropout(seed: int = 0):
    """tiny_bert's architecture and initial weights with dropout off, so differently batched runs can agree."""
    from transformers import BertForSequenceClassification

    config = tiny_bert().config
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def build_trainer(output_dir, config=None, callbacks=(), n_examples=40, dropout=True, trainer_class=Trainer,
                  **arg_overrides) -> Trainer:
    config = config or small_config()
    model = prepare_model(tiny_bert() if dropout else tiny_bert_without_dropout(), config)
    model.train()
    # BERT's forward takes **kwargs, so the Trainer assumes its loss is normalised by num_items_in_batch and
    # skips dividing by the accumulation steps; BERT's classification loss ignores it (a plain mean), which
    # would make accumulated gradients gradient_accumulation_steps times too large.
    model.accepts_loss_kwargs = False
    return trainer_class(
        model=model,
        args=training_args(output_dir, **arg_overrides),
        train_dataset=random_classification_dataset(n=n_examples),
        callbacks=[RankDynaCallback(config), *callbacks],
    )


def gates(model) -> dict[str, torch.Tensor]:
    return {name: layer.gate.detach().clone() for name, layer in svd_layers(model).items()}


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class CrashAfterSave(TrainerCallback):
    """Stands in for a killed job: raise once the checkpoint of ``step`` is on disk."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash after checkpoint-{self.step}")
