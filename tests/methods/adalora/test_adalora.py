import torch
from transformers import Trainer, TrainingArguments

from rankdyna_trainer.methods import get_method
from rankdyna_trainer.methods.adalora import AdaLoraCallback, adalora_config, adalora_rank_pattern, prepare_adalora

from ...compression_checks import assert_reloads_identically
from ...conftest import random_classification_dataset, tiny_bert


def _train(tmp_path, callbacks, steps=20):
    model = tiny_bert()
    config = adalora_config(model, total_steps=steps, target_rank=2, init_rank=6, interval=2)
    model = prepare_adalora(model, config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=5,
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(), callbacks=callbacks).train()
    return model


def test_callback_drives_the_budget_down_to_target(tmp_path):
    model = _train(tmp_path / "with", [AdaLoraCallback()])
    ranks = adalora_rank_pattern(model)
    assert len(ranks) == 12  # every targeted matrix of the 2-layer model
    # peft's final budget is target_rank (2) times the number of adapted matrices
    assert sum(ranks.values()) <= 2 * 12
    assert sum(ranks.values()) < 6 * 12
    # masked singular values really are zero in the layers
    for name, module in model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            kept = int((module.lora_E["default"].detach().abs() > 0).sum())
            assert kept <= 6


def test_without_the_callback_the_trainer_never_allocates(tmp_path):
    model = _train(tmp_path / "without", [])
    assert adalora_rank_pattern(model) == {}


def test_exports_merged_dense_model_that_reloads(tmp_path):
    model = _train(tmp_path / "train", [AdaLoraCallback()], steps=10)
    merged, modules = get_method("adalora").export(model)
    assert modules == {}
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert_reloads_identically(merged, modules, "adalora", tmp_path / "export")
    assert torch.is_tensor(next(merged.parameters()))
